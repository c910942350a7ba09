"""Benchmarks: planner quality, search time, prediction accuracy, the emulated-cluster testbed."""
