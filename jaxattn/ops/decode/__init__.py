"""Decode attention: one query token per sequence over a KV cache, dense or over gathered key positions (sparse
decode), optionally with the probability row or its per-kv-head column sum; reference, chunked XLA, Pallas GPU
(split-K flash-decoding) and Pallas TPU (scalar-prefetched block lists) backends."""

from jaxattn.ops.decode.api import decode_attention as decode_attention
from jaxattn.ops.decode.config import DecodeCall as DecodeCall
from jaxattn.ops.decode.config import PallasGpuConfig as PallasGpuConfig
from jaxattn.ops.decode.config import PallasTpuConfig as PallasTpuConfig
from jaxattn.ops.decode.config import XlaConfig as XlaConfig
