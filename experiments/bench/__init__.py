"""Kernel benchmark harness: ``python -m experiments bench`` (results: README, "Measured").

Files by role: ``registry`` (presets and cases), ``timing`` (jit, warm-up, median of repeats), ``flops`` (FLOP
counts from the exact mask area), ``run`` (implementations and anchors side by side, CLI), ``report`` (JSONL,
markdown table, PNG plot), ``linear`` (the linear-attention family: presets ``linear_*``).
"""
