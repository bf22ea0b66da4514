"""Flax modules built on jaxattn's functional ops (the only jaxattn package that imports flax).

- :class:`MultiHeadAttention`: Flax NNX multi-head / grouped-query attention with RoPE and a KV cache.
- :func:`apply_rope`: rotary position embeddings.
- :func:`as_attention_fn`: an ``attention_fn`` for ``flax.nnx.MultiHeadAttention`` /
  ``flax.linen.MultiHeadDotProductAttention``.
- :class:`LinenMultiHeadAttention`: the Linen bridge of :class:`MultiHeadAttention`.
- Cross-attention variants (:mod:`jaxattn.nn.cross`): :class:`CrossAttention` (RCA, tanh gate, GLCA, PWCA, LoRRA
  switches), :class:`LabelAttentionHead`, :class:`CoAttentionLayer` / :class:`LXMERTEncoder`,
  :class:`SideMemoryBlock`, :class:`LoRRASideLearner`, :class:`ObjectPointerHead`.
- :class:`HaloAttention`: HaloNet's blocked local 2-D attention with halo and 2-D relative positions.
- :class:`LandmarkAttention`: landmark attention (grouped softmax) with top-k block retrieval when decoding.
- :class:`LinearAttention`: kernelised linear attention (elu+1, ReLU, cosFormer, Performer) with CAB patterns.
- CAB's zoo (:mod:`jaxattn.nn.efficient`): :class:`Nystrom`, :class:`Lara`, :class:`ProbSparse`, :class:`ABC`,
  :class:`S4D`, :class:`LongShort`, :class:`VanillaSoftmax` and the :data:`ZOO` registry (``efficient.make``).
- TransNormerLLM: :class:`SRMSNorm`, :class:`SGLU`, :class:`LRPE`, :class:`GatedLinearAttention`,
  :class:`TransNormerBlock`, :class:`TransNormerLM`, :func:`tnl_decay_slopes`.
- Pair / retrieval encoders (:mod:`jaxattn.nn.pair`, losses in :mod:`jaxattn.nn.pair_losses`): :class:`PairEncoder`
  (bi / cross / fid-with-view-tokens), :class:`TextBackbone` (causal <-> bidirectional mask switch), pooling
  (:func:`mean_pool`, :func:`cls_pool`, :func:`last_pool`, :func:`attention_pool`), :func:`dse_features`,
  :class:`DSEHead`, :class:`ViewAnchorHead`.
- Attention Residuals (:mod:`jaxattn.nn.attnres`): :func:`depth_attention`, :class:`DepthAttention`,
  :class:`AttnResDecoder` (standard / Full / Block AttnRes, two-phase inference), :class:`AttnResLM`.
"""

from jaxattn.nn.adapters import AttentionFn as AttentionFn
from jaxattn.nn.attnres import AttnResDecoder as AttnResDecoder
from jaxattn.nn.attnres import AttnResLM as AttnResLM
from jaxattn.nn.attnres import DepthAttention as DepthAttention
from jaxattn.nn.attnres import depth_attention as depth_attention
from jaxattn.nn.adapters import as_attention_fn as as_attention_fn
from jaxattn.nn.attention import MultiHeadAttention as MultiHeadAttention
from jaxattn.nn.cross import CrossAttention as CrossAttention
from jaxattn.nn.cross import LabelAttentionHead as LabelAttentionHead
from jaxattn.nn.cross import CoAttentionLayer as CoAttentionLayer
from jaxattn.nn.cross import EncoderLayer as EncoderLayer
from jaxattn.nn.cross import LXMERTEncoder as LXMERTEncoder
from jaxattn.nn.cross import SideMemoryBlock as SideMemoryBlock
from jaxattn.nn.cross import LoRRASideLearner as LoRRASideLearner
from jaxattn.nn.cross import ObjectPointerHead as ObjectPointerHead
from jaxattn.nn.cross import top_r_indices as top_r_indices
from jaxattn.nn.cross import batch_distractor as batch_distractor
from jaxattn.nn.halo import HaloAttention as HaloAttention
from jaxattn.nn.efficient import ABC as ABC
from jaxattn.nn.efficient import ZOO as ZOO
from jaxattn.nn.efficient import Lara as Lara
from jaxattn.nn.efficient import LongShort as LongShort
from jaxattn.nn.efficient import Nystrom as Nystrom
from jaxattn.nn.efficient import ProbSparse as ProbSparse
from jaxattn.nn.efficient import S4D as S4D
from jaxattn.nn.efficient import VanillaSoftmax as VanillaSoftmax
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
from jaxattn.nn.pair import DSEHead as DSEHead
from jaxattn.nn.pair import PairEncoder as PairEncoder
from jaxattn.nn.pair import TextBackbone as TextBackbone
from jaxattn.nn.pair import ViewAnchorHead as ViewAnchorHead
from jaxattn.nn.pair import attention_pool as attention_pool
from jaxattn.nn.pair import cls_pool as cls_pool
from jaxattn.nn.pair import dse_features as dse_features
from jaxattn.nn.pair import last_pool as last_pool
from jaxattn.nn.pair import mean_pool as mean_pool
