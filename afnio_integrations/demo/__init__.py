"""``afnio demo``: watch an ordinary LangChain chain get better, offline.

Builds a plain LangChain sentiment chain (``ChatPromptTemplate | ChatOpenAI |
StrOutputParser``) for Facility Support messages, optimizes its system prompt with
:func:`afnio_integrations.langchain.optimize`, and prints the accuracy before and after,
the old and new prompt, LM calls, tokens and cost, where the optimized prompts were
saved, and, on its last line, the run's HTML report (``run report: <path>``; the run's
folder is ``<--out>/run``: its run log ``run_log.jsonl``, ``report.html``, metrics and
checkpoints). By default everything runs against the bundled simulator (a deterministic
stand-in, clearly labelled; offline, no key). With ``--openai`` and ``OPENAI_API_KEY``,
real models are used (the key is checked before anything else is done). If the
dataset cannot be downloaded (or ``--sample`` is given), the demo uses a small labelled
sample of support messages shipped with afnio, and says so before anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["main"]

START_PROMPT = "Classify the sentiment of the message."


def _sample() -> tuple[list[Any], list[Any], str]:
    """The bundled sample: (train, val, description)."""
    raw = json.loads(
        resources.files("afnio_integrations.demo")
        .joinpath("sample_messages.json")
        .read_text("utf-8")
    )
    train, val = (
        [({"message": r["message"]}, r["sentiment"]) for r in raw[split]]
        for split in ("train", "val")
    )
    return train, val, f"the bundled sample ({len(train)} + {len(val)} messages)"


def _facility_support(dataset_file: str | None) -> tuple[list[Any], list[Any]]:
    from afnio.utils.datasets import FacilitySupport

    with contextlib.ExitStack() as stack:
        root = None
        if dataset_file:
            root = stack.enter_context(tempfile.TemporaryDirectory())
            raw = Path(root) / "FacilitySupport" / "raw"
            raw.mkdir(parents=True)
            shutil.copy(dataset_file, raw / "dataset.json")
        splits = []
        for split in ("train", "val"):
            data = FacilitySupport(split, root=root, download=dataset_file is None)
            splits.append(
                [
                    ({"message": data[i][0].data}, data[i][1][1].data)
                    for i in range(len(data))
                ]
            )
        return splits[0], splits[1]


def exact_match(prediction: str, target: str) -> int:
    """1 if the chain's answer is the label (ignoring case and spaces), else 0."""
    return int(prediction.strip().lower() == target.strip().lower())


DESCRIPTION = """\
Watch an ordinary LangChain chain get better: afnio optimizes the system prompt of a
sentiment classifier (ChatPromptTemplate | ChatOpenAI | StrOutputParser) on Facility
Support messages, then prints the validation accuracy before and after, the old and
new system prompt, the LM calls, tokens and cost, and where the optimized prompts
were saved; its last line names the run's HTML report (open it in a browser: score
curves, cost by phase, each prompt change with the feedback behind it)."""
EPILOG = """\
By default everything runs offline against afnio's bundled simulator (a deterministic
stand-in, not a model; no API key). The Facility Support dataset is downloaded on
first use into $AFNIO_DATA_DIR/FacilitySupport/raw/ (default data folder:
~/.cache/afnio/data); if it cannot be downloaded, the demo says so first and uses a
small sample of support messages shipped with afnio.

examples:
  afnio demo                                     # simulator, Facility Support
  afnio demo --sample                            # simulator, the bundled sample
  afnio demo --dataset-file path/to/dataset.json # a local copy of the dataset
  afnio demo --backward upstream                 # afnio's core-API feedback calls
  OPENAI_API_KEY=... afnio demo --openai --model gpt-4o-mini   # real models, real cost
"""


def _reason(error: BaseException) -> str:
    """A one-line reason for a failed dataset load (the last mirror's error for a
    failed download)."""
    cause = error.__cause__ or error
    text = " ".join(part.strip() for part in str(cause).splitlines() if part.strip())
    return text or type(cause).__name__


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="afnio demo",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--epochs", type=int, default=3, help="training epochs (default: 3)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="training batch size (default: 16)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="shuffling seed (default: 0)"
    )
    parser.add_argument(
        "--sample",
        action="store_true",
        help="use the small sample shipped with afnio (no download)",
    )
    parser.add_argument(
        "--dataset-file",
        metavar="PATH",
        help="a local copy of Facility Support's dataset.json (no download)",
    )
    parser.add_argument(
        "--openai",
        action="store_true",
        help="use OpenAI's real models (needs OPENAI_API_KEY; costs money)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the model name (default: the simulator's; gpt-4o-mini with --openai)",
    )
    parser.add_argument(
        "--out",
        default="runs/afnio-demo",
        metavar="DIR",
        help="where to save the optimized prompts (DIR/prompts.json) and the run "
        "(DIR/run: run log, HTML report, metrics, checkpoints; default: "
        "runs/afnio-demo)",
    )
    parser.add_argument(
        "--backward",
        choices=("cheap", "upstream"),
        default="cheap",
        help="how the feedback is written: cheap (default: the metric's feedback "
        "stated directly, the chat-backward calls grouped 8 messages a call) or "
        "upstream (an LM call writes the metric's feedback, one chat-backward call "
        "per message)",
    )
    parser.add_argument(
        "--max-cost",
        type=float,
        default=None,
        metavar="USD",
        help="stop before the run would spend more than this (in USD)",
    )
    return parser


def _load_data(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[list[Any], list[Any], str]:
    """The training and validation pairs and a description of them.

    An explicit ``--dataset-file`` that cannot be read is an error (exit 2); a failed
    download falls back to the bundled sample, which is said on one line, before the
    demo's header.
    """
    if args.sample:
        return _sample()
    facility = "Facility Support (66 training and 66 validation emails)"
    if args.dataset_file:
        if not Path(args.dataset_file).is_file():
            parser.error(
                f"--dataset-file {args.dataset_file}: no such file (pass the path "
                "of a local copy of Facility Support's dataset.json, or drop the "
                "option to download it)"
            )
        try:
            train, val = _facility_support(args.dataset_file)
        except Exception as e:
            parser.error(f"--dataset-file {args.dataset_file}: {_reason(e)}")
        return train, val, facility
    try:
        train, val = _facility_support(None)
    except Exception as e:  # no network, a mirror down...
        train, val, source = _sample()
        print(
            f"Facility Support could not be downloaded ({_reason(e)}): using "
            f"{source} instead (--sample skips the download; --dataset-file "
            "path/to/dataset.json uses a local copy).",
            flush=True,
        )
        return train, val, source
    return train, val, facility


def main(argv: list[str] | None = None) -> int:
    """Run the demo with command-line arguments ``argv`` (default: ``sys.argv``);
    returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.openai and not os.environ.get("OPENAI_API_KEY"):
        # before the download, the imports and the simulator: fail at once
        parser.error(
            "--openai needs OPENAI_API_KEY in the environment (export "
            "OPENAI_API_KEY=..., or drop --openai to run offline against the "
            "bundled simulator)"
        )

    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    import afnio
    from afnio.models.openai import OpenAI
    from afnio_integrations._report import describe_backward
    from afnio_integrations.langchain import optimize

    start = time.perf_counter()
    train, val, source = _load_data(args, parser)

    with contextlib.ExitStack() as stack:
        if args.openai:
            model = args.model or "gpt-4o-mini"
            base_url, key = None, None
            label = f"OpenAI ({model}): real models, real cost"
        else:
            from afnio.testing import SIMULATOR_MODEL, Simulator

            sim = stack.enter_context(Simulator())
            model, base_url, key = (
                args.model or SIMULATOR_MODEL,
                sim.base_url,
                "sk-simulator",
            )
            label = (
                "the bundled SIMULATOR (afnio.testing): a deterministic stand-in, "
                "not a model; offline, no key"
            )
        client = stack.enter_context(OpenAI(base_url=base_url, api_key=key))
        afnio.set_backward_model_client(client, completion_args={"model": model})
        prompt = ChatPromptTemplate.from_messages(
            [("system", START_PROMPT), ("human", "{message}")]
        )
        llm = ChatOpenAI(model=model, base_url=base_url, api_key=key, temperature=0)
        chain = prompt | llm | StrOutputParser()  # an ordinary LangChain chain

        print(
            f"afnio demo: optimizing a LangChain chain's system prompt against {label}"
        )
        print(f"data: {source}")
        out = Path(args.out)
        chain, report = optimize(
            chain,
            train,
            exact_match,
            valset=val,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            max_cost=args.max_cost,
            root_dir=str(out / "run"),  # the run log and the HTML report
            backward=args.backward,
            model=model,
        )
        out.mkdir(parents=True, exist_ok=True)
        prompts_file = out / "prompts.json"
        prompts_file.write_text(json.dumps(report.prompts_after, indent=2), "utf-8")

    before, after = report.score_before or 0.0, report.score_after or 0.0
    print()
    print(f"validation accuracy: {before:.1%} -> {after:.1%}")
    print(f"old system prompt: {report.prompts_before['prompt0.system0']}")
    print(f"new system prompt: {report.prompts_after['prompt0.system0']}")
    print(
        f"LM calls (chain, feedback, optimizer): {report.calls}, "
        f"tokens: {report.tokens}, "
        f"cost: ${report.cost:.4f}"
    )
    if report.backward is not None:
        print(f"backward: {describe_backward(report.backward)}")
    print(f"optimized prompts saved to {prompts_file}")
    print(f"({time.perf_counter() - start:.1f} s)")
    if report.report_path is not None:
        print(f"run report: {report.report_path}")
    else:  # a warning said why; the run log is there to write it from
        print(
            f"run report: not written (see the warning above); write it with: "
            f"afnio report {report.run_dir}"
        )
    return 0
