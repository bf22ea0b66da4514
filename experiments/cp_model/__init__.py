"""``python -m experiments cp_model``: a cost model of context-parallel attention (modelled, not measured)."""
