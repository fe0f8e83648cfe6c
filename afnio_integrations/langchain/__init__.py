"""afnio for LangChain: trace an existing LCEL chain, ``create_agent`` agent or
LangGraph graph into an afnio graph, optimize its prompt texts (system prompts, tool
descriptions) with textual gradients, and write them back into the user's own objects.

Install with the ``langchain`` extra: ``pip install -e '.[langchain]'``.
"""

from afnio_integrations._warnings import AfnioTracingWarning
from afnio_integrations.langchain._discovery import PromptSlot, find_prompt_slots
from afnio_integrations.langchain._estimate import estimate
from afnio_integrations.langchain._langgraph import AgentOutput, trainable
from afnio_integrations.langchain._model import LangChainChatModel
from afnio_integrations.langchain._optimize import OptimizeReport, optimize
from afnio_integrations.langchain._runnable import AfnioRunnable
from afnio_integrations.langchain._saving import (
    ChainLoadError,
    ChainSaveError,
    load_chain,
    save_chain,
)
from afnio_integrations.langchain._traced import TracedChain, trace
from afnio_integrations.langchain._trajectory import (
    TrajectoryMode,
    answer_match,
    expected_tools,
    final_answer_of,
    tool_calls_of,
    trajectory_match,
)
from afnio_integrations.langchain._writeback import (
    PlaceholderMismatchError,
    heal_braces,
)

__all__ = [
    "AfnioRunnable",
    "AgentOutput",
    "AfnioTracingWarning",
    "ChainLoadError",
    "ChainSaveError",
    "LangChainChatModel",
    "OptimizeReport",
    "PlaceholderMismatchError",
    "PromptSlot",
    "TracedChain",
    "TrajectoryMode",
    "answer_match",
    "estimate",
    "expected_tools",
    "final_answer_of",
    "find_prompt_slots",
    "heal_braces",
    "load_chain",
    "optimize",
    "save_chain",
    "tool_calls_of",
    "trace",
    "trainable",
    "trajectory_match",
]
