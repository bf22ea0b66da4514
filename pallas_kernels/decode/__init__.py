"""Decode attention kernels (one query token per sequence over a KV cache, dense or over listed key blocks):
``gpu`` (Pallas Triton lowering, split-K flash-decoding with an XLA combine), ``tpu`` (Pallas Mosaic TPU,
scalar-prefetched block lists); ``lists`` builds their block lists and key masks."""
