"""Cross-attention vs gradient saliency on a toy seq2seq task (``python -m experiments cross_saliency``)."""
