"""Integrations of afnio with the libraries people already use:
``afnio_integrations.langchain`` (extra ``langchain``) and
``afnio_integrations.dspy`` (extra ``dspy``). Each is imported on its own, so one
works without the other library installed."""

__all__: list[str] = []
