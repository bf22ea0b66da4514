"""Flax modules built on jaxattn's functional ops (the only jaxattn package that imports flax).

- :class:`MultiHeadAttention`: Flax NNX multi-head / grouped-query attention with RoPE and a KV cache.
- :func:`apply_rope`: rotary position embeddings.
- :func:`as_attention_fn`: an ``attention_fn`` for ``flax.nnx.MultiHeadAttention`` /
  ``flax.linen.MultiHeadDotProductAttention``.
- :class:`LinenMultiHeadAttention`: the Linen bridge of :class:`MultiHeadAttention`.
"""

from jaxattn.nn.adapters import AttentionFn as AttentionFn
from jaxattn.nn.adapters import as_attention_fn as as_attention_fn
from jaxattn.nn.attention import MultiHeadAttention as MultiHeadAttention
from jaxattn.nn.linen import LinenMultiHeadAttention as LinenMultiHeadAttention
from jaxattn.nn.rope import apply_rope as apply_rope
from jaxattn.nn.rope import rope_frequencies as rope_frequencies
