"""Helpers of ``python -m experiments.benchmark``.

Timing and FLOP counting, per-method restore and training benches, markdown tables. Pure torch/diffusers; the
command-line entry point lives in ``experiments/benchmark.py``.
"""
