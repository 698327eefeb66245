"""Benchmarks (commands, not tests): ``python -m mmfuse.bench.throughput`` / ``mmfuse bench throughput``."""
