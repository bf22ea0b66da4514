"""Softmax attention kernels: ``gpu`` (Pallas Triton lowering), ``tpu`` (Pallas Mosaic TPU)."""
