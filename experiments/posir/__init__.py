"""KaLM-style contrastive retrievers and PosIR's position profile at toy scale (``python -m experiments posir``)."""
