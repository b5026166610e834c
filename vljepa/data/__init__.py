"""Datasets: record types, readers for the on-disk split format, and the built-in world."""
