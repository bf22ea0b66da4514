"""Linear attention with decay (TransNormerLLM / Lightning attention): recurrent reference, chunkwise XLA, Pallas
kernels, decode."""

from jaxattn.ops.linear.api import linear_attention as linear_attention
from jaxattn.ops.linear.api import linear_attention_step as linear_attention_step
from jaxattn.ops.linear.config import LinearCall as LinearCall
from jaxattn.ops.linear.config import LinearResiduals as LinearResiduals
from jaxattn.ops.linear.config import PallasGpuConfig as PallasGpuConfig
from jaxattn.ops.linear.config import PallasTpuConfig as PallasTpuConfig
from jaxattn.ops.linear.config import XlaConfig as XlaConfig
from jaxattn.ops.linear.reference import linear_attention_parallel as linear_attention_parallel
from jaxattn.ops.linear.reference import linear_attention_reference as linear_attention_reference
