"""``afnio demo``: watch an ordinary LangChain chain get better, offline.

Builds a plain LangChain sentiment chain (``ChatPromptTemplate | ChatOpenAI |
StrOutputParser``) for Facility Support messages, optimizes its system prompt with
:func:`afnio_integrations.langchain.optimize`, and prints the accuracy before and after,
the old and new prompt, LM calls, tokens and cost, and where the optimized prompts were
saved. By default everything runs against the bundled simulator (a deterministic
stand-in, clearly labelled; offline, no key). With ``--openai`` and ``OPENAI_API_KEY``,
real models are used. If the dataset cannot be downloaded (or ``--sample`` is given),
the demo uses a small labelled sample of support messages shipped with afnio.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="afnio demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", action="store_true", help="use the bundled sample")
    parser.add_argument(
        "--dataset-file", help="a local copy of Facility Support's dataset.json"
    )
    parser.add_argument(
        "--openai", action="store_true", help="real models (OPENAI_API_KEY)"
    )
    parser.add_argument("--model", default=None)
    parser.add_argument(
        "--out", default="runs/afnio-demo", help="where to save the prompts"
    )
    parser.add_argument("--max-cost", type=float, default=None, help="budget in USD")
    args = parser.parse_args(argv)

    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    import afnio
    from afnio.models.openai import OpenAI
    from afnio_integrations.langchain import optimize

    start = time.perf_counter()
    if args.sample:
        train, val, source = _sample()
    else:
        try:
            train, val = _facility_support(args.dataset_file)
            source = "Facility Support (66 training and 66 validation emails)"
        except Exception as e:  # no network, a corrupted file...
            print(f"Could not load the Facility Support dataset ({e}).")
            print("Using the bundled sample of support messages written for afnio.")
            train, val, source = _sample()

    with contextlib.ExitStack() as stack:
        if args.openai:
            if not os.environ.get("OPENAI_API_KEY"):
                parser.error("--openai needs OPENAI_API_KEY in the environment")
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
        chain, report = optimize(
            chain,
            train,
            exact_match,
            valset=val,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            max_cost=args.max_cost,
            model=model,
        )
        out = Path(args.out)
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
    print(f"optimized prompts saved to {prompts_file}")
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0
