"""graff's benchmark suite: every scheduler side by side at a fixed step budget.

Run ``python -m benchmarks run --suite quick|full`` or ``python -m benchmarks overhead``;
see ``benchmarks/README.md``.
"""
