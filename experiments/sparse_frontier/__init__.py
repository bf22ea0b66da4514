"""The Sparse Frontier at toy scale (``python -m experiments sparse_frontier``)."""
