"""Bayes-PFL RCA experiment: zero-shot localisation on unseen digit classes (``python -m experiments bayes_pfl``)."""
