"""Pieces shared by the integrations' optimization loops (LangChain ``optimize``, DSPy
``AfnioTGD``): a dataset of indices and an agent that runs one step per split."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from afnio.cognitive.modules.module import Module
from afnio.utils.data import Dataset

__all__ = ["IndexDataset", "SplitAgent"]


class IndexDataset(Dataset):
    """``n`` items, each ``(index, index)``: the loader batches indices and the agent
    looks the rows up (they can be any Python objects)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, index


class SplitAgent(Module):
    """A Trainer agent whose steps all run :meth:`_step` on a split (``"train"`` for
    training, ``"val"`` for validation and test) and whose optimizer is built by
    ``make_optimizer``."""

    def __init__(self, make_optimizer: Callable[[], Any]) -> None:
        super().__init__()
        object.__setattr__(self, "_make_optimizer", make_optimizer)

    def _step(self, batch: Any, split: str) -> dict[str, Any]:
        raise NotImplementedError  # abstract: every subclass defines its step

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        return self._make_optimizer()
