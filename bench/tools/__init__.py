"""Benchmark and campaign scripts (``python -m dpmem.bench.tools.NAME``): speed, reliability, planted bugs, audit power."""
