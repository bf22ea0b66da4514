"""Attention Residuals experiment (``python -m experiments attnres``)."""
