"""Benchmarks: each module runs as `python -m bench.<name>` and prints its figures beside a
baseline measured in the same run."""
