"""The engine benchmark's parts; the entry point is ``benchmarks/bench_engine.py``."""
