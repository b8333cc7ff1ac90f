"""Benchmark suites: python -m benchmarks [floor] [musiclm] [musicgen] [--quick]; results in benchmarks/results/."""
