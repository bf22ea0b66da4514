"""DSE at toy scale: distilled sentence embeddings vs the cross-encoder teacher (``python -m experiments dse``)."""
