"""Benchmarks shipped with Vespa: BENCHMARK=benchmarks.<name>:benchmark."""
