"""Measurement on real hardware: layers (compute.py, memory.py), links (network.py), devices."""
