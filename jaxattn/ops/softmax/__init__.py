"""Masked softmax attention: reference, blockwise XLA, cuDNN and the Pallas GPU / TPU kernels (one backend each)."""

from jaxattn.ops.softmax.api import softmax_attention as softmax_attention
from jaxattn.ops.softmax.config import BlockSizes as BlockSizes
from jaxattn.ops.softmax.config import PallasGpuConfig as PallasGpuConfig
from jaxattn.ops.softmax.config import PallasTpuConfig as PallasTpuConfig
from jaxattn.ops.softmax.config import SoftmaxCall as SoftmaxCall
from jaxattn.ops.softmax.config import SoftmaxResiduals as SoftmaxResiduals
from jaxattn.ops.softmax.block_sparse import block_sparse_attention as block_sparse_attention
