"""Shared pieces of the pair / retrieval encoder experiments (``dse``, ``posir``): a pure-function training loop
with exact resume (:mod:`experiments.pair.train`) and ranking metrics plus the BM25 baseline
(:mod:`experiments.pair.metrics`)."""
