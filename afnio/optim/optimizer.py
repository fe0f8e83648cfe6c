"""``afnio.optim.Optimizer``: the base class of optimizers, like ``torch.optim``.

Parameters are organised in ``param_groups`` (each a dict of options plus ``params``);
``state`` maps each parameter to its optimizer state (difference 5: a dict keyed by
parameter). ``state_dict()`` numbers the parameters across groups so a checkpoint
survives rebuilding the model; model clients inside groups are stored as
``{"class_type", "provider", "usage"}`` and passed back at load time by key.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from afnio._secrets import mask_secrets, restore_secrets
from afnio._variable import Variable
from afnio.models.model import BaseModel
from afnio.models.model_registry import MODEL_REGISTRY

__all__ = ["Optimizer", "required"]


class _RequiredParameter:
    """Marks an option without a default: every param group must set it."""

    def __repr__(self) -> str:
        return "<required parameter>"


required = _RequiredParameter()


def _is_saved_model(value: Any) -> bool:
    """Whether ``value`` is a model client as a checkpoint stores it."""
    return isinstance(value, Mapping) and value.get("class_type") in MODEL_REGISTRY


class Optimizer:
    """Base class of optimizers.

    Args:
        params: Variables to optimize, or dicts defining parameter groups.
        defaults: default values of the options, filled into every group.

    Subclasses implement :meth:`step`.
    """

    def __init__(
        self,
        params: Iterable[Variable] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
    ) -> None:
        if isinstance(params, (Variable, set, dict)):
            raise TypeError(
                "`params` must be an iterable of Variables or of dicts (parameter "
                f"groups), got {type(params).__name__}; sets are unordered: use a list."
            )
        self.defaults = defaults
        self.state: dict[Variable, dict[str, Any]] = {}
        self.param_groups: list[dict[str, Any]] = []
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of parameters (with its own options) to optimize.

        Raises:
            TypeError: for a non-dict group, non-Variable params or a set.
            ValueError: for a parameter already in another group, a non-leaf, or a
                missing required option.
        """
        if not isinstance(param_group, dict):
            raise TypeError(
                f"param group must be a dict, got {type(param_group).__name__}."
            )
        params = param_group.get("params")
        if isinstance(params, Variable):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but "
                "the ordering of a set changes between runs: use a list."
            )
        else:
            params = list(params or [])
        for p in params:
            if not isinstance(p, Variable):
                raise TypeError(
                    f"optimizer can only optimize Variables, got {type(p).__name__}."
                )
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Variable")
        param_group["params"] = params
        for name, default in self.defaults.items():
            if default is required and name not in param_group:
                raise ValueError(
                    f"parameter group didn't specify a value of required optimization "
                    f"parameter {name}"
                )
            param_group.setdefault(
                name,
                copy.copy(default) if isinstance(default, (list, dict)) else default,
            )
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(param_group)

    def clear_grad(self) -> None:
        """Clear ``.grad`` of every parameter in place (the lists keep their
        identity)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p._grad:
                    p._grad.clear()

    zero_grad = clear_grad
    """Alias of :meth:`clear_grad` (difference 5)."""

    def step(self, closure: Any = None) -> Any:
        """Update the parameters (implemented by subclasses)."""
        raise NotImplementedError(  # abstract: subclasses implement step
            f"{type(self).__name__}.step is not implemented."
        )

    # -- checkpoints -----------------------------------------------------------------

    def _index(self) -> dict[int, int]:
        index: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
        return index

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: state}, "param_groups": [group with "params": [index,
        ...]]}``; model clients become ``{"class_type", "provider", "usage"}``, and
        credentials in the options (``completion_args``' ``extra_headers``
        ``Authorization``, an ``extra_query`` ``key``, any ``sk-...`` value: see
        ``afnio._secrets``) are saved as ``"<redacted>"``, never in clear."""
        index = self._index()
        groups = []
        for group in self.param_groups:
            masked = mask_secrets(
                {
                    k: v
                    for k, v in group.items()
                    if k != "params" and not isinstance(v, BaseModel)
                }
            )
            saved = {
                k: (copy.deepcopy(v) if isinstance(v, BaseModel) else masked[k])
                for k, v in group.items()
                if k != "params"
            }
            saved["params"] = [index[id(p)] for p in group["params"]]
            groups.append(saved)
        params = {id(p): p for g in self.param_groups for p in g["params"]}
        state = {
            index[id(p)]: s
            for key, s in self.state.items()
            if (p := params.get(id(key))) is not None
        }
        return {"state": state, "param_groups": groups}

    def load_state_dict(
        self,
        state_dict: Mapping[str, Any],
        model_clients: Mapping[str, BaseModel] | None = None,
    ) -> None:
        """Restore what :meth:`state_dict` returned, into the current parameters.

        Args:
            state_dict: the saved dict (e.g. from ``afnio.load``).
            model_clients: the live client for every model option in the groups, by
                option name (e.g. ``{"model_client": client}``); their usage is
                restored from the checkpoint.

        A credential saved masked (``"<redacted>"``, see :meth:`state_dict`) keeps
        the value this optimizer's group holds at that place, or is left out when the
        group has none: a masked placeholder is never loaded, so never sent.

        Raises:
            ValueError: different group count or sizes, or a missing model client.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                "loaded state dict has a different number of parameter groups "
                f"({len(saved_groups)} vs {len(self.param_groups)})"
            )
        for i, (saved, group) in enumerate(
            zip(saved_groups, self.param_groups, strict=True)
        ):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"loaded state dict contains a parameter group {i} that doesn't "
                    f"match the size of optimizer's group ({len(saved['params'])} vs "
                    f"{len(group['params'])})"
                )
        model_clients = dict(model_clients or {})
        new_groups = []
        restores = []
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            # masked credentials come back from the live group (or are left out)
            options = restore_secrets(
                {
                    k: v
                    for k, v in saved.items()
                    if k != "params" and not _is_saved_model(v)
                },
                group,
            )
            new = {}
            for key, value in saved.items():
                if key == "params":
                    continue
                if not _is_saved_model(value):
                    if key in options:
                        new[key] = options[key]
                    continue
                cls = MODEL_REGISTRY[value["class_type"]]
                client = model_clients.get(key)
                if not isinstance(client, cls):
                    raise ValueError(
                        f"Missing model client for '{key}' of expected type "
                        f"'{value['class_type']}'. Pass it as load_state_dict(..., "
                        f"model_clients={{'{key}': {value['class_type']}(...)}})."
                    )
                restores.append((client, value.get("usage")))
                new[key] = client
            new["params"] = group["params"]
            new_groups.append(new)
        id_map = {}
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            for index, p in zip(saved["params"], group["params"], strict=True):
                id_map[index] = p
        state: dict[Variable, dict[str, Any]] = {}
        for index, value in state_dict["state"].items():
            p = id_map.get(int(index))
            if p is not None:
                state[p] = copy.copy(value)
        for group, new in zip(self.param_groups, new_groups, strict=True):
            group.clear()
            group.update(new)
        self.state = state
        for client, usage in restores:
            if usage:
                client.update_usage(usage)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            shown = mask_secrets({k: v for k, v in group.items() if k != "params"})
            for key in sorted(shown):
                lines.append(f"    {key}: {shown[key]}")
        lines.append(")")
        return "\n".join(lines)
