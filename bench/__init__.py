"""Benchmarks: each compares our code against a baseline measured in the same run.

`python -m bench` runs the CPU suite (see bench/README.md); each module also runs alone.
"""
