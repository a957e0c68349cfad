"""Compute accounting (analytic FLOPs) and benchmarks."""

from .flops import forward_macs, pretraining_exaflops

__all__ = ["forward_macs", "pretraining_exaflops"]
