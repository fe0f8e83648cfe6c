"""``AfnioRunnable``: any afnio Module as a LangChain ``Runnable``, so afnio programs
compose inside LCEL (``prompt | AfnioRunnable(module) | parser``).

``invoke``/``ainvoke`` call the module (its runs are reported to the config's
callbacks as a chain run); ``batch``, ``abatch``, ``stream`` and ``astream`` come from
``Runnable``'s defaults. The output is the module's Variable's ``data`` (a plain value
for the next step), or the Variable itself with ``return_variables=True``.
"""

from __future__ import annotations

import asyncio
import inspect
import typing
from typing import Any

from langchain_core.runnables import Runnable, RunnableConfig

from afnio._variable import Variable
from afnio.cognitive.modules.module import Module

__all__ = ["AfnioRunnable"]


class AfnioRunnable(Runnable[Any, Any]):
    """An afnio :class:`~afnio.cognitive.Module` as a LangChain Runnable.

    Args:
        module: the module; it is called with the Runnable's input.
        name: the run name shown to callbacks (default: the module's class name).
        return_variables: return the Variable instead of its ``data``.

    Example::

        chain = AfnioRunnable(my_module) | RunnableLambda(str.upper)
        chain.invoke("hello")
    """

    def __init__(
        self, module: Module, name: str | None = None, return_variables: bool = False
    ) -> None:
        if not isinstance(module, Module):
            raise TypeError(
                f"`module` must be an afnio Module, got {type(module).__name__}."
            )
        self.module = module
        self.name = name or type(module).__name__
        self.return_variables = return_variables

    @property
    def InputType(self) -> Any:
        """The annotation of the module's ``forward`` input (``Any`` if none)."""
        try:
            hints = typing.get_type_hints(type(self.module).forward)
        except Exception:  # unresolvable annotations
            return Any
        params = [
            p
            for p in inspect.signature(self.module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        return hints.get(params[0].name, Any) if params else Any

    @property
    def OutputType(self) -> Any:
        """``Variable`` with ``return_variables``, else its data (``Any``)."""
        return Variable if self.return_variables else Any

    def _call(self, value: Any) -> Any:
        output = self.module(value)
        if isinstance(output, Variable) and not self.return_variables:
            return output.data
        return output

    def invoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Any:
        return self._call_with_config(self._call, input, config, **kwargs)

    async def ainvoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Any:
        async def call(value: Any) -> Any:
            # afnio's sync API works from any loop; run it off this one
            return await asyncio.get_running_loop().run_in_executor(
                None, self._call, value
            )

        return await self._acall_with_config(call, input, config, **kwargs)
