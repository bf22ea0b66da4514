"""Passkey retrieval with landmark attention: ``python -m experiments passkey`` (see :mod:`experiments.passkey.run`)."""
