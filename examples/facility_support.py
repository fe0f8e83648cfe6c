"""Train a sentiment classifier's system prompt with TGD on the Facility Support data.

The classifier is an afnio Module with one trainable Parameter (its system prompt); the
loss is ExactMatchEvaluator; the Trainer runs fit/test, writes metrics, checkpoints and
the run log (run_log.jsonl) into --root-dir, and prints the cost; the last line names
the run's HTML report (afnio.report.write_report: score curves, cost by phase, each
change of the prompt with the feedback behind it). By default everything runs offline
against the bundled simulator (a deterministic stand-in, see afnio.testing); with
--openai and OPENAI_API_KEY set it uses OpenAI.

Run:
    python examples/facility_support.py          # simulator; downloads the data
    python examples/facility_support.py --dataset-file path/to/dataset.json
    python examples/facility_support.py --sample  # the small sample shipped with afnio
    OPENAI_API_KEY=... python examples/facility_support.py --openai --model gpt-4o-mini
    python examples/facility_support.py --dry-run --openai --model gpt-5-mini
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import afnio
from afnio import cognitive as cog
from afnio.models.model import ChatCompletionModel
from afnio.optim import TGD
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader
from afnio.utils.datasets import FacilitySupport

START_PROMPT = "Classify the sentiment of the message."


class SentimentClassifier(cog.Module):
    """A system prompt (trainable) + the message, answered by an LM; scored by exact
    match against the sentiment label."""

    def __init__(
        self, client: ChatCompletionModel, model: str, prompt: str = START_PROMPT
    ) -> None:
        super().__init__()
        self.system_prompt = cog.Parameter(
            prompt, role="system prompt for sentiment classification"
        )
        self.register_buffer(
            "user_template",
            afnio.Variable("{message}", role="customer message template"),
        )
        self.client = client
        self.completion_args = {"model": model, "temperature": 0}
        self.chat = cog.ChatCompletion()
        self.exact_match = cog.ExactMatchEvaluator()

    def forward(self, emails: afnio.Variable) -> afnio.Variable:
        messages = [
            {"role": "system", "content": [self.system_prompt]},
            {"role": "user", "content": [self.user_template]},
        ]
        return self.chat(
            self.client, messages, inputs={"message": emails}, **self.completion_args
        )

    def _step(self, batch: Any) -> dict[str, Any]:
        emails, (_urgency, sentiment, _categories) = batch
        score, explanation = self.exact_match(self(emails), sentiment)
        return {
            "loss": (score, explanation),
            "accuracy": score.data / len(sentiment.data),
        }

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._step(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._step(batch)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._step(batch)

    def configure_optimizers(self) -> TGD:
        return TGD(
            [self.system_prompt], model_client=self.client, **self.completion_args
        )


@contextlib.contextmanager
def data_root(dataset_file: str | None) -> Iterator[str | None]:
    """A root laid out as FacilitySupport expects, holding a local copy of the file."""
    if dataset_file is None:
        yield None  # downloads into $AFNIO_DATA_DIR or ~/.cache/afnio/data
        return
    with tempfile.TemporaryDirectory() as root:
        raw = Path(root) / "FacilitySupport" / "raw"
        raw.mkdir(parents=True)
        shutil.copy(dataset_file, raw / "dataset.json")
        yield root


Item = tuple[afnio.Variable, tuple[afnio.Variable, afnio.Variable, afnio.Variable]]


def sample_splits() -> tuple[list[Item], list[Item], list[Item]]:
    """The small sample of support messages shipped with afnio (the demo's), in
    FacilitySupport's item shape: ``(email, (urgency, sentiment, categories))`` with
    only the sentiment known. Train, val and test (the val messages: the sample has
    no third split)."""
    raw = json.loads(
        resources.files("afnio_integrations.demo")
        .joinpath("sample_messages.json")
        .read_text("utf-8")
    )

    def items(split: str) -> list[Item]:
        return [
            (
                afnio.Variable(row["message"], role="input email or message"),
                (
                    afnio.Variable("", role="output urgency"),
                    afnio.Variable(row["sentiment"], role="output sentiment"),
                    afnio.Variable("{}", role="output categories"),
                ),
            )
            for row in raw[split]
        ]

    return items("train"), items("val"), items("val")


def loaders(
    root: str | None, batch_size: int, seed: int, *, sample: bool = False
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train, val and test loaders of Facility Support (downloaded when ``root`` is
    None), or of the bundled sample with ``sample=True`` or when the download fails
    (said on one line)."""
    if sample:
        train, val, test = sample_splits()
    else:
        kwargs: dict[str, Any] = {"root": root, "download": root is None}
        try:
            train = FacilitySupport("train", **kwargs)
            val = FacilitySupport("val", **kwargs)
            test = FacilitySupport("test", **kwargs)
        except RuntimeError as e:  # no network, a mirror down
            if root is not None:  # a --dataset-file copy that is not the dataset
                raise
            train, val, test = sample_splits()
            print(
                f"Facility Support could not be downloaded ({e}): using the small "
                f"sample shipped with afnio ({len(train)} + {len(val)} messages) "
                "instead (--sample skips the download; --dataset-file "
                "path/to/dataset.json uses a local copy).",
                flush=True,
            )
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, seed=seed),
        DataLoader(val, batch_size=batch_size),
        DataLoader(test, batch_size=batch_size),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dataset-file", help="a local copy of dataset.json (no download)"
    )
    parser.add_argument(
        "--sample",
        action="store_true",
        help="use the small sample of support messages shipped with afnio (no "
        "download)",
    )
    parser.add_argument(
        "--openai", action="store_true", help="use OpenAI (needs OPENAI_API_KEY)"
    )
    parser.add_argument(
        "--model", default=None, help="model name (default: afnio-sim-1 / gpt-4o-mini)"
    )
    parser.add_argument(
        "--root-dir",
        default="runs/facility_support",
        help="metrics, checkpoints, the run log and the HTML report",
    )
    parser.add_argument("--max-cost", type=float, default=None, help="budget in USD")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the estimated LM calls, tokens and cost of fit and stop (no LM "
        "call; works without OPENAI_API_KEY)",
    )
    args = parser.parse_args(argv)
    if args.dataset_file is not None and not Path(args.dataset_file).is_file():
        parser.error(
            f"--dataset-file {args.dataset_file}: no such file (pass the path of a "
            "local copy of Facility Support's dataset.json, or drop the option to "
            "download it)"
        )

    with contextlib.ExitStack() as stack:
        if args.dry_run:
            root = stack.enter_context(data_root(args.dataset_file))
            train, val, _test = loaders(
                root, args.batch_size, args.seed, sample=args.sample
            )
            model = args.model or ("gpt-4o-mini" if args.openai else "afnio-sim-1")
            agent = SentimentClassifier(None, model)
            trainer = Trainer(max_epochs=args.epochs, enable_agent_summary=False)
            print(trainer.estimate(agent, train, val, models=model))
            print(
                f"(fit only: the test passes before and after add "
                f"{2 * len(_test.dataset)} forward calls)"
            )
            return 0
        if args.openai:
            if not os.environ.get("OPENAI_API_KEY"):
                parser.error("--openai needs OPENAI_API_KEY in the environment")
            client = stack.enter_context(afnio.models.openai.OpenAI())
            model = args.model or "gpt-4o-mini"
        else:
            from afnio.testing import SIMULATOR_MODEL, Simulator

            sim = stack.enter_context(Simulator())
            client = stack.enter_context(
                afnio.models.openai.OpenAI(
                    base_url=sim.base_url, api_key="sk-simulator"
                )
            )
            model = args.model or SIMULATOR_MODEL
        afnio.set_backward_model_client(
            client, completion_args={"model": model, "temperature": 0}
        )
        root = stack.enter_context(data_root(args.dataset_file))
        train, val, test = loaders(root, args.batch_size, args.seed, sample=args.sample)
        agent = SentimentClassifier(client, model)
        trainer = Trainer(
            max_epochs=args.epochs,
            default_root_dir=args.root_dir,
            max_cost=args.max_cost,
            enable_agent_summary=False,
        )
        before = trainer.test(agent, test)
        trainer.fit(agent, train, val)
        after = trainer.test(agent, test)
        print(
            f"test accuracy before: {before['test_accuracy']:.3f}  "
            f"after: {after['test_accuracy']:.3f}"
        )
        print(f"final system prompt:\n{agent.system_prompt.data}")
    # the run log of fit (and the test after it) as one HTML file (no LM call)
    from afnio.report import write_report

    print(f"run report: {write_report(trainer.default_root_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
