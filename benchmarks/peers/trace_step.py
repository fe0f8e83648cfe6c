"""One Trace (``trace-opt`` 0.1.3.8) OptoPrime step on the Facility Support task.

Run with Trace's own venv (this script never imports afnio)::

    /tmp/trvenv/bin/python benchmarks/peers/trace_step.py \\
        --base-url http://127.0.0.1:8000/v1 --model afnio-sim-1 --batch 4 \\
        --data /tmp/facility_sentiment.json

The step is written the way Trace's examples write prompt optimization
(``examples/bbh/run_prompt_bigbench_trace.py``): a trainable ``node`` (a
``ParameterNode``) holds the system prompt; a ``@bundle`` function calls the LM with
it and one message, once per sample; each sample gets the example's feedback string
(``The answer is correct! ...`` or ``The answer is wrong. We expect the output of
your answer to be "<label>". ...``). A batch follows Trace's minibatch recipe
(``MinibatchAlgorithm`` of the later releases): the outputs and the feedbacks are
joined by a ``@bundle`` ``batchify`` (``ID [i]: ...`` lines; 0.1.3.8 does not ship it,
so it is defined here the same way), then ``optimizer.zero_feedback()``,
``optimizer.backward(target, feedback)`` (no LM call: it propagates the graph) and
``optimizer.step()`` (one OptoPrime call).

LM backend: ``--backend custom`` (default) is Trace's ``CustomLLM`` (an
``openai.OpenAI`` client on ``TRACE_CUSTOMLLM_URL``); ``--backend litellm`` is its
``LiteLLM`` backend on ``openai/<model>`` with ``OPENAI_API_BASE`` set. Neither caches
(their ``cache`` flag is stored but unused, and no LiteLLM cache is configured). The
same backend serves the forward and optimizer calls.

Data: a JSON list of ``{"message": ..., "sentiment": ...}``; the first ``--batch``
items are used; unless ``--cold``, one untimed warm-up request goes first (lazy
imports, one connection; the simulator counts it). Output: one JSON line on stdout
(Trace's import banner goes to stderr), ``{"library", "batch", "wall_s",
"forward_s", "backward_s", "optimizer_s", "lm_calls", "new_prompt"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import Counter

# Trace's backend module prints its choice on import: keep stdout for the JSON line.
os.environ.setdefault("TRACE_DEFAULT_LLM_BACKEND", "CustomLLM")
with contextlib.redirect_stdout(sys.stderr):
    from opto.trace import bundle

INITIAL_PROMPT = "Classify the sentiment of the message."
DESCRIPTION = (
    "[ParameterNode] The system prompt of the LM that classifies the sentiment of a "
    "customer message as positive, negative or neutral."
)
CORRECT = "The answer is correct! No need to change anything."
WRONG = (
    'The answer is wrong. We expect the output of your answer to be "{label}". Please '
    "modify the prompt and relevant parts of the program to help LLM produce the right "
    "answer."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--data", required=True)
    parser.add_argument("--prompt", default=INITIAL_PROMPT)
    parser.add_argument("--backend", choices=("custom", "litellm"), default="custom")
    parser.add_argument("--api-key", default="sk-simulator")
    parser.add_argument(
        "--cold", action="store_true", help="no untimed warm-up request first"
    )
    return parser.parse_args(argv)


CALLS: Counter[str] = Counter()
PHASE = ["setup"]
LM: list = []  # the LM callable, set by main()


@bundle()
def classify(system_prompt, message):
    """Call the LM with the system prompt and the customer message; return its
    answer, the sentiment label (positive, negative or neutral)."""
    response = LM[0](
        messages=[
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": message},
        ]
    )
    return response.choices[0].message.content.strip()


@bundle()
def batchify(*items):
    """Concatenate the items into a single string"""
    output = ""
    for i, item in enumerate(items):
        output += f"ID {[i]}: {item}\n"
    return output


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["TRACE_CUSTOMLLM_URL"] = args.base_url
    os.environ["TRACE_CUSTOMLLM_MODEL"] = args.model
    os.environ["TRACE_CUSTOMLLM_API_KEY"] = args.api_key
    os.environ["TRACE_LITELLM_MODEL"] = f"openai/{args.model}"
    os.environ["OPENAI_API_BASE"] = args.base_url
    os.environ.setdefault("OPENAI_API_KEY", args.api_key)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

    with contextlib.redirect_stdout(sys.stderr):  # Trace's backend banner
        from opto.optimizers import OptoPrime
        from opto.trace import node
        from opto.utils.llm import CustomLLM, LiteLLM

    # CustomLLM reads its URL, model and key from TRACE_CUSTOMLLM_* when model=None.
    base_llm = (
        CustomLLM() if args.backend == "custom" else LiteLLM(f"openai/{args.model}")
    )

    def llm(*a, **kw):
        CALLS[PHASE[0]] += 1
        return base_llm(*a, **kw)

    LM.append(llm)
    calls, phase = CALLS, PHASE

    with open(args.data, encoding="utf-8") as f:
        items = json.load(f)[: args.batch]

    system_prompt = node(
        args.prompt, name="system_prompt", trainable=True, description=DESCRIPTION
    )

    class CountingLLM:
        def __call__(self, *a, **kw):
            return llm(*a, **kw)

    optimizer = OptoPrime([system_prompt], llm=CountingLLM())

    if not args.cold:  # one untimed request: lazy imports, one connection
        llm(messages=[{"role": "user", "content": "Hello"}])
    start = time.perf_counter()
    phase[0] = "forward"
    outputs, feedbacks, correct = [], [], 0
    for item in items:
        answer = classify(system_prompt, item["message"])
        ok = answer.data.strip().casefold() == item["sentiment"].strip().casefold()
        correct += ok
        outputs.append(answer)
        feedbacks.append(CORRECT if ok else WRONG.format(label=item["sentiment"]))
    target = batchify(*outputs)
    feedback = batchify(*feedbacks).data
    forward_end = time.perf_counter()
    phase[0] = "backward"
    optimizer.zero_feedback()
    optimizer.backward(target, feedback)
    backward_end = time.perf_counter()
    phase[0] = "optimizer"
    optimizer.step()
    end = time.perf_counter()

    result = {
        "library": "trace-opt 0.1.3.8",
        "backend": args.backend,
        "batch": len(items),
        "wall_s": round(end - start, 3),
        "forward_s": round(forward_end - start, 3),
        "backward_s": round(backward_end - forward_end, 3),
        "optimizer_s": round(end - backward_end, 3),
        "lm_calls": {k: calls[k] for k in ("forward", "backward", "optimizer")},
        "correct": correct,
        "new_prompt": system_prompt.data,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
