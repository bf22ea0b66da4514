"""CAB at toy scale: efficiency length, mini benchmark, compositional index (``python -m experiments cab``)."""
