"""``python -m experiments prune``: attention-guided visual-token pruning on a toy VLM (see ``run.py``)."""
