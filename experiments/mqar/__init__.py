"""``python -m experiments mqar``: Zoology's multi-query associative recall at small scale (see :mod:`.run`)."""
