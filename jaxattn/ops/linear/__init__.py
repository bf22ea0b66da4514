"""Linear attention with decay (TransNormerLLM / Lightning attention): recurrent reference, chunkwise XLA, decode."""

from jaxattn.ops.linear.api import linear_attention as linear_attention
from jaxattn.ops.linear.api import linear_attention_step as linear_attention_step
from jaxattn.ops.linear.config import LinearConfig as LinearConfig
from jaxattn.ops.linear.reference import linear_attention_parallel as linear_attention_parallel
from jaxattn.ops.linear.reference import linear_attention_reference as linear_attention_reference
