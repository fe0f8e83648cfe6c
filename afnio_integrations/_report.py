"""The report of an optimization run (LangChain ``optimize``, DSPy ``AfnioTGD``)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from afnio.autodiff.options import CHEAP, UPSTREAM, BackwardOptions
from afnio.models.phases import PhaseRow
from afnio.trainer.projection import RunProfile

__all__ = ["FEEDBACK_SHOWN_CHARS", "OptimizeReport", "describe_backward"]

FEEDBACK_SHOWN_CHARS = 500
"""How much of each parameter's last feedback ``str(OptimizeReport)`` shows when no
prompt changed."""


def describe_backward(options: BackwardOptions) -> str:
    """How a run's backward passes made their feedback, in one line: the preset's
    name (``cheap``, ``upstream``, or ``custom``) and what it does.

    >>> describe_backward(CHEAP)
    'cheap (direct evaluator feedback, chat backward in groups of 8)'
    >>> describe_backward(UPSTREAM)
    'upstream (LM-written evaluator feedback, one chat-backward call per sample)'
    >>> describe_backward(BackwardOptions("lm", 4))
    'custom (LM-written evaluator feedback, chat backward in groups of 4)'
    """
    name = "cheap" if options == CHEAP else "upstream" if options == UPSTREAM else ""
    feedback = (
        "direct evaluator feedback"
        if options.evaluator_feedback == "direct"
        else "LM-written evaluator feedback"
    )
    n = options.chat_samples_per_call
    chat = (
        "one chat-backward call per sample"
        if n == 1
        else f"chat backward in groups of {n}"
    )
    return f"{name or 'custom'} ({feedback}, {chat})"


@dataclass
class OptimizeReport:
    """What an optimization run did.

    * ``score_before``/``score_after``: the validation score (0 to 1) before and
      after; ``score_after`` is ``None`` when the run stopped early (``max_cost``),
      so the last texts were never scored.
    * ``prompts_before``/``prompts_after``: the optimized texts (LangChain prompt
      slots, or DSPy predictor instructions) by key; ``prompt_diff`` shows them.
    * ``history``: the Trainer's per-epoch rows.
    * ``calls``, ``tokens``, ``cost``: every LM call of the run, the program's own
      and afnio's feedback and optimizer calls; ``phases`` splits them by phase
      (forward, evaluator, backward, optimizer) and model.
    * ``failed_samples``: program calls that raised (scored as failures).
    * ``backward``: the :class:`~afnio.BackwardOptions` the run's backward passes
      used (``optimize(backward=...)``, ``AfnioTGD(backward=...)``; ``cheap`` by
      default): ``str(report)`` states it on its ``backward:`` line, e.g.
      ``backward: cheap (direct evaluator feedback, chat backward in groups of
      8)`` (see :func:`describe_backward`). ``None``: not recorded.
    * ``train_samples``, ``val_samples``, ``steps``: what the run did (for
      :meth:`profile`).
    * ``last_feedback``: the feedback each optimized text received at the last
      optimizer step that had any (by the parameter's role): what the optimizer
      was told. When no prompt changed, ``str(report)`` shows it (truncated to
      :data:`FEEDBACK_SHOWN_CHARS` characters), so the reason the optimizer saw,
      e.g. a simulator's ``No rule can be written: ...``, or a real model's
      critique, is in the report.
    * ``run_dir``: the run's folder (``root_dir``, or the temporary folder made
      when none was given): its run log ``run_log.jsonl``, metrics and
      checkpoints.
    * ``report_path``: the run's HTML report (``<run_dir>/report.html``, written
      by :func:`afnio.report.write_report` when the run ended; open it in a
      browser); ``None`` when it could not be written (a warning said why, and
      ``afnio report <run_dir>`` writes it from the run log). ``str(report)``
      ends with ``run report: <path>``.
    """

    score_before: float | None
    score_after: float | None
    prompts_before: dict[str, str]
    prompts_after: dict[str, str]
    history: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0
    tokens: int = 0
    cost: float = 0.0
    stopped_reason: str | None = None
    failed_samples: int = 0
    phases: list[PhaseRow] = field(default_factory=list)
    train_samples: int = 0
    val_samples: int = 0
    steps: int = 0
    last_feedback: dict[str, str] = field(default_factory=dict)
    run_dir: str | None = None
    report_path: str | None = None
    backward: BackwardOptions | None = None

    def profile(self) -> RunProfile:
        """This run's rates by phase, to project another configuration before
        running it (a pilot on a subset, then the full run)::

            pilot = tgd.compile(program, trainset=train[:32], valset=val[:32])
            full = project(tgd.report.profile(), n_train=len(train),
                           n_val=len(val), epochs=3, batch_size=16)
            print(full)  # calls, tokens and cost by phase
        """
        return RunProfile.from_rows(
            self.phases,
            train_samples=self.train_samples,
            val_samples=self.val_samples,
            steps=self.steps,
        )

    @property
    def prompt_diff(self) -> str:
        """A unified diff of every changed prompt."""
        parts = []
        for key, old in self.prompts_before.items():
            new = self.prompts_after.get(key, old)
            if new != old:
                parts.extend(
                    difflib.unified_diff(
                        old.splitlines(),
                        new.splitlines(),
                        f"{key} (before)",
                        f"{key} (after)",
                        lineterm="",
                    )
                )
        return "\n".join(parts)

    def __str__(self) -> str:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        text = (
            f"score before: {fmt(self.score_before)}  after: {fmt(self.score_after)}\n"
            f"LM calls: {self.calls}  tokens: {self.tokens}  cost: ${self.cost:.4f}\n"
            + "".join(
                f"  {r.phase}: {r.calls} calls, {r.prompt_tokens} + "
                f"{r.completion_tokens} tokens, ${r.cost:.4f} ({r.model})\n"
                for r in self.phases
            )
            + (
                f"backward: {describe_backward(self.backward)}\n"
                if self.backward is not None
                else ""
            )
            + (self.prompt_diff or self._unchanged())
        )
        if self.report_path is not None:
            text += f"\nrun report: {self.report_path}"
        return text

    def _unchanged(self) -> str:
        """The ``(no prompt changed)`` line, with what the optimizer was told."""
        if not self.last_feedback:
            return (
                "(no prompt changed; no optimized text received feedback: every "
                "training sample passed, or the feedback was empty)"
            )
        lines = ["(no prompt changed) the last feedback the optimizer received:"]
        for role, text in self.last_feedback.items():
            flat = " ".join(text.split())
            if len(flat) > FEEDBACK_SHOWN_CHARS:
                flat = flat[: FEEDBACK_SHOWN_CHARS - 3].rstrip() + "..."
            lines.append(f"  {role}: {flat}")
        return "\n".join(lines)
