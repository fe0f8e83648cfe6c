"""Utilities. Import ``afnio.utils.data`` and ``afnio.utils.datasets`` explicitly."""
