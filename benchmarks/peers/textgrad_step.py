"""One TextGrad (0.1.8) prompt-optimization step on the Facility Support sentiment task.

Run with TextGrad's own venv (this script never imports afnio)::

    /tmp/tgvenv/bin/python benchmarks/peers/textgrad_step.py \\
        --base-url http://127.0.0.1:8000/v1 --model afnio-sim-1 --batch 4 \\
        --data /tmp/facility_sentiment.json

The step is written the way TextGrad's ``evaluation/prompt_optimization.py`` writes
it: a ``tg.Variable`` system prompt (``requires_grad=True``), ``tg.BlackboxLLM(engine,
system_prompt)`` called once per sample, a ``StringBasedFunction`` exact-match loss
(TextGrad's ``string_based_equality_fn`` pattern, on labels instead of integers),
``tg.sum(losses).backward()`` and ``tg.TGD(...).step()``. The same engine serves the
forward, backward and optimizer calls.

Engine: ``--engine openai`` (default) is ``ChatExternalClient``, TextGrad's documented
route for an OpenAI-compatible server (an ``openai.OpenAI`` client with a base URL);
its always-on disk cache (``CachedEngine``) is disabled by overriding ``_check_cache``
and ``_save_cache``. ``--engine litellm`` is ``experimental:openai/<model>`` with
``cache=False`` and ``OPENAI_API_BASE`` set to the base URL. TextGrad's JSONL log goes
to a temporary directory (``TEXTGRAD_LOG_DIR``) unless that variable is set.

Data: a JSON list of ``{"message": ..., "sentiment": ...}``; the first ``--batch``
items are used; unless ``--cold``, one untimed warm-up request goes first (lazy
imports, one connection; the simulator counts it). Output: one JSON line on stdout,
``{"library", "batch", "wall_s", "forward_s", "backward_s", "optimizer_s",
"lm_calls", "new_prompt"}``; ``lm_calls`` counts the engine calls of each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter

INITIAL_PROMPT = "Classify the sentiment of the message."
ROLE = "system prompt to the language model that classifies the sentiment of a message"
FUNCTION_PURPOSE = (
    "The runtime of string-based function that checks if the prediction is correct."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--data", required=True)
    parser.add_argument("--prompt", default=INITIAL_PROMPT)
    parser.add_argument("--engine", choices=("openai", "litellm"), default="openai")
    parser.add_argument("--api-key", default="sk-simulator")
    parser.add_argument(
        "--cold", action="store_true", help="no untimed warm-up request first"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TEXTGRAD_LOG_DIR", tempfile.mkdtemp(prefix="textgrad-log-"))
    os.environ.setdefault("OPENAI_API_KEY", args.api_key)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

    import openai
    import textgrad as tg
    from textgrad.autograd.string_based_ops import StringBasedFunction
    from textgrad.engine.local_model_openai_api import ChatExternalClient

    calls: Counter[str] = Counter()
    phase = ["setup"]

    if args.engine == "openai":

        class UncachedClient(ChatExternalClient):
            """ChatExternalClient without TextGrad's always-on disk cache."""

            def _check_cache(self, prompt):
                return None

            def _save_cache(self, prompt, response):
                return None

            def __call__(self, prompt, **kwargs):
                calls[phase[0]] += 1
                return super().__call__(prompt, **kwargs)

        client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
        engine = UncachedClient(client=client, model_string=args.model)
    else:
        from textgrad.engine_experimental.litellm import LiteLLMEngine

        os.environ["OPENAI_API_BASE"] = args.base_url

        class CountingLiteLLM(LiteLLMEngine):
            def __call__(self, content, **kwargs):
                calls[phase[0]] += 1
                return super().__call__(content, **kwargs)

        engine = CountingLiteLLM(model_string=f"openai/{args.model}", cache=False)

    tg.set_backward_engine(engine, override=True)

    with open(args.data, encoding="utf-8") as f:
        items = json.load(f)[: args.batch]

    def exact_match(prediction, ground_truth_answer):
        predicted = str(prediction.value).strip().casefold()
        return int(predicted == str(ground_truth_answer.value).strip().casefold())

    system_prompt = tg.Variable(args.prompt, requires_grad=True, role_description=ROLE)
    model = tg.BlackboxLLM(engine, system_prompt)
    optimizer = tg.TGD(engine=engine, parameters=[system_prompt])
    eval_fn = StringBasedFunction(exact_match, function_purpose=FUNCTION_PURPOSE)

    if not args.cold:  # one untimed request: lazy imports, one connection
        engine("Hello", system_prompt="Answer briefly.")
    start = time.perf_counter()
    phase[0] = "forward"
    optimizer.zero_grad()
    losses = []
    for item in items:
        x = tg.Variable(
            item["message"],
            requires_grad=False,
            role_description="query to the language model",
        )
        y = tg.Variable(
            item["sentiment"],
            requires_grad=False,
            role_description="correct answer for the query",
        )
        response = model(x)
        losses.append(eval_fn(inputs=dict(prediction=response, ground_truth_answer=y)))
    forward_end = time.perf_counter()
    phase[0] = "backward"
    total_loss = tg.sum(losses)
    total_loss.backward()
    backward_end = time.perf_counter()
    phase[0] = "optimizer"
    optimizer.step()
    end = time.perf_counter()

    result = {
        "library": f"textgrad {tg.__version__}",
        "engine": args.engine,
        "batch": len(items),
        "wall_s": round(end - start, 3),
        "forward_s": round(forward_end - start, 3),
        "backward_s": round(backward_end - forward_end, 3),
        "optimizer_s": round(end - backward_end, 3),
        "lm_calls": {k: calls[k] for k in ("forward", "backward", "optimizer")},
        "correct": sum(int(str(loss.value)) for loss in losses),
        "new_prompt": system_prompt.value,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
