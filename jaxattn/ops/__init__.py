"""Functional attention ops, one package per family (api, reference, xla, pallas)."""
