"""Masked softmax attention: reference, blockwise XLA, cuDNN (and Pallas kernels when available)."""

from jaxattn.ops.softmax.api import softmax_attention as softmax_attention
from jaxattn.ops.softmax.config import AttentionConfig as AttentionConfig
from jaxattn.ops.softmax.config import BlockSizes as BlockSizes
from jaxattn.ops.softmax.block_sparse import block_sparse_attention as block_sparse_attention
