"""CrossTune experiment: label-description cross-attention head vs linear probe (``python -m experiments crosstune``)."""
