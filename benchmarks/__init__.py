"""Benchmarks of animus; how to run them is in ``benchmarks/README.md``."""
