"""afnio's benchmarks: ``python -m benchmarks run`` (see ``benchmarks/__main__.py``);
each script also runs on its own (``python benchmarks/step_latency.py``)."""
