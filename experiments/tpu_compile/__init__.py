"""``python -m experiments tpu_compile``: deviceless compilation of the TPU kernels (see :mod:`.run`)."""
