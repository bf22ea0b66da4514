"""ACT: hidden attention sinks and attention calibration at toy scale (``python -m experiments act``)."""
