"""Speed and accuracy benchmarks of stagejax against the study's PyTorch recipe (issue #5).

Run from the repository root, e.g. ``python -m benchmarks.throughput --help``;
results and exact command lines are in ``benchmarks/RESULTS.md``.
"""
