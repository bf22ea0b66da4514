"""``python -m experiments retrieval_heads``: retrieval heads of a tiny decoder on a needle-copy task."""
