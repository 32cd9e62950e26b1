"""Benchmarks: ratios measured in one run, printed as tables and written as JSON."""
