"""``python -m experiments recycled``: Recycled Attention / RefreshKV on the tiny long-context LM (see run.py)."""
