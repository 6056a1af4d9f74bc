"""Benchmarks (not installed): run from a checkout, e.g. `python bench/replay.py --local`."""
