"""Benchmarks: the end-to-end step-latency ladder (`ditengine-bench`) and per-kernel microbenchmarks."""
