"""Benchmarks (`make bench` / `python -m bench`): print figures and ratios measured in one run.
Nothing here passes or fails on a timing. See docs/benchmarks.md."""
