"""TransNormerLLM quality and speed experiment (``python -m experiments transnormer``)."""
