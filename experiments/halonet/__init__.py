"""``python -m experiments halonet``: HaloNet-tiny vs conv net vs global attention on digits (see run.py)."""
