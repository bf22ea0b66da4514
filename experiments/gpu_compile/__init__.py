"""``python -m experiments gpu_compile``: deviceless compilation of the GPU kernels (see :mod:`.run`)."""
