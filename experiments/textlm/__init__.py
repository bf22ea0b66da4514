"""A tiny byte-level text LM substrate shared by experiments: the stdlib corpus (:mod:`.corpus`) and the training
helpers (:mod:`.train`). Settings in ``configs/textlm.py``."""
