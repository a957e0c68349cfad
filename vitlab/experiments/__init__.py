"""Experiments of the paper in small, runnable on a CPU (see docs/experiments.md)."""
