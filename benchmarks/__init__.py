"""Benchmarks: each stage measured against the limit and the common baseline in the same run.

Run from the repository root, e.g. ``python -m benchmarks.bench_tokenize``. Figures recorded in
benchmarks/RESULTS.md with machine, date and command.
"""
