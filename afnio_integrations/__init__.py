"""Integrations of afnio with LangChain and DSPy (added subpackage by subpackage)."""

__all__: list[str] = []
