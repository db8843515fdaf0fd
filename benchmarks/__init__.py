"""Benchmarks for ragguard (not tests: run them by hand, see ``benchmarks/README.md``)."""
