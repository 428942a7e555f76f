"""BENCHMARK for the signed worker in the load benchmark: a fixed, huge max_perf, so that
admission computes its estimate for every request but never refuses one (the benchmark
measures the proxy, not the queue)."""


def benchmark(backend_url: str, session: object) -> float:
    return 1e9
