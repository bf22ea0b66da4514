"""Flax modules built on jaxattn's functional ops (the only jaxattn package that imports flax).

- :class:`MultiHeadAttention`: Flax NNX multi-head / grouped-query attention with RoPE and a KV cache.
- :func:`apply_rope`: rotary position embeddings.
- :func:`as_attention_fn`: an ``attention_fn`` for ``flax.nnx.MultiHeadAttention`` /
  ``flax.linen.MultiHeadDotProductAttention``.
- :class:`LinenMultiHeadAttention`: the Linen bridge of :class:`MultiHeadAttention`.
- :class:`LandmarkAttention`: landmark attention (grouped softmax) with top-k block retrieval when decoding.
- :class:`LinearAttention`: kernelised linear attention (elu+1, ReLU, cosFormer, Performer) with CAB patterns.
- TransNormerLLM: :class:`SRMSNorm`, :class:`SGLU`, :class:`LRPE`, :class:`GatedLinearAttention`,
  :class:`TransNormerBlock`, :class:`TransNormerLM`, :func:`tnl_decay_slopes`.
"""

from jaxattn.nn.adapters import AttentionFn as AttentionFn
from jaxattn.nn.adapters import as_attention_fn as as_attention_fn
from jaxattn.nn.attention import MultiHeadAttention as MultiHeadAttention
from jaxattn.nn.landmark import LandmarkAttention as LandmarkAttention
from jaxattn.nn.linear import LinearAttention as LinearAttention
from jaxattn.nn.linen import LinenMultiHeadAttention as LinenMultiHeadAttention
from jaxattn.nn.rope import apply_rope as apply_rope
from jaxattn.nn.rope import rope_frequencies as rope_frequencies
from jaxattn.nn.transnormer import LRPE as LRPE
from jaxattn.nn.transnormer import SGLU as SGLU
from jaxattn.nn.transnormer import GatedLinearAttention as GatedLinearAttention
from jaxattn.nn.transnormer import SRMSNorm as SRMSNorm
from jaxattn.nn.transnormer import TransNormerBlock as TransNormerBlock
from jaxattn.nn.transnormer import TransNormerLM as TransNormerLM
from jaxattn.nn.transnormer import srms_norm as srms_norm
from jaxattn.nn.transnormer import tnl_decay_slopes as tnl_decay_slopes
