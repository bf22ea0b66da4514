"""Shared toy substrates (shipped data only), reused across the cross-attention experiments.

- :mod:`~experiments.substrates.canvas`: digit canvases from scikit-learn's bundled digits, with boxes and region
  crops; train / test never share a digit image.
- :mod:`~experiments.substrates.grammar`: questions and referring expressions with box-as-text answers.
- :mod:`~experiments.substrates.vit`: ViT-tiny (and the pre-LN block the toy LM shares).
- :mod:`~experiments.substrates.vlm`: the toy VLM (ViT -> projector -> causal LM over [visual; text]), trained once
  per config and cached under ``runs/substrates/<fingerprint>/``.
- :mod:`~experiments.substrates.text`: template text with topic labels.

Modules import jax / flax only where they build models (``vit``, ``vlm``); the data modules are numpy.
"""
