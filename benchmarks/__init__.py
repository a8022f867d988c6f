"""Benchmarks: each stage measured against the limit and the common baseline in the same run.

Run from the repository root, e.g. ``python -m benchmarks.bench_tokenize``; ``python -m benchmarks``
runs the whole suite (:mod:`benchmarks.suite`: every stage of a streaming evaluation, the verdict,
sweeps, baselines and memory scaling). Figures recorded in benchmarks/RESULTS.md with machine, date
and command.
"""
