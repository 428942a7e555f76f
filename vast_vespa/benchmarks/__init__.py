"""Benchmarks shipped with Vespa: BENCHMARK=vast_vespa.benchmarks.<name>:benchmark
(``benchmarks.<name>:benchmark``, the form Vast templates use, is the same)."""
