"""jaxattn: fast, exact attention mechanisms for JAX.

Public surface::

    jaxattn.softmax_attention(q, k, v, mask=..., segment_ids=..., bias=..., implementation=...)
    jaxattn.block_sparse_attention(q, k, v, kv_block_indices, kv_block_counts, block_q=..., block_k=...)
    jaxattn.linear_attention(q, k, v, log_decay=..., causal=..., initial_state=..., return_final_state=...)
    jaxattn.linear_attention_step(q_t, k_t, v_t, state, log_decay=...)   # one decode step
    jaxattn.halo_attention(q, k, v, block=..., halo=...)   # HaloNet blocked local 2-D attention, images
    jaxattn.landmark_attention(q, k, v, block_size=...)   # grouped softmax over landmark blocks
    jaxattn.decode_attention(q_t, k_cache, v_cache, lengths=..., index=..., return_stats=...)  # one-token decode
    jaxattn.BlockSizes, jaxattn.PallasGpuConfig, jaxattn.PallasTpuConfig   # softmax backends' tuning configs:
        # implementation=("xla", BlockSizes(...)) / ("pallas_gpu", PallasGpuConfig(...)) / block_sizes=BlockSizes(...)
    jaxattn.backend    # the op protocol: Backend, flash_vjp, dispatch, FallbackWarning, use_platform
    jaxattn.masks      # static mask algebra (Full, Causal, Local, Slices, BlockSparse, generators)
    jaxattn.testing    # tolerance table, random inputs, assertions, CAB conformance checks
    jaxattn.parallel   # context parallelism: ring (zigzag), all-gather, Ulysses, USP, linear state passing
    jaxattn.sparse     # training-free sparse prefill: vertical-slash, FlexPrefill, block top-k, attention recall
    jaxattn.cache      # KV cache for batched decoding; StreamingLLM, H2O, SnapKV, Ada-SnapKV, Quest, recycled attention
    jaxattn.analysis   # attention capture / statistics / rollout / saliency, head masks, ACT, retrieval heads
    jaxattn.prune      # attention-guided token pruning: scorers, debiasing, top-k schedules, gather / mask executors
    jaxattn.nn         # Flax NNX modules (imports flax; import it explicitly)
"""

from jaxattn import analysis as analysis
from jaxattn import backend as backend
from jaxattn import cache as cache
from jaxattn import masks as masks
from jaxattn import parallel as parallel
from jaxattn import prune as prune
from jaxattn import sparse as sparse
from jaxattn import testing as testing
from jaxattn.ops.decode import decode_attention as decode_attention
from jaxattn.ops.halo import halo_attention as halo_attention
from jaxattn.ops.landmark import landmark_attention as landmark_attention
from jaxattn.ops.linear import linear_attention as linear_attention
from jaxattn.ops.linear import linear_attention_step as linear_attention_step
from jaxattn.ops.softmax import BlockSizes as BlockSizes
from jaxattn.ops.softmax import PallasGpuConfig as PallasGpuConfig
from jaxattn.ops.softmax import PallasTpuConfig as PallasTpuConfig
from jaxattn.ops.softmax import block_sparse_attention as block_sparse_attention
from jaxattn.ops.softmax import softmax_attention as softmax_attention

__version__ = "0.1.0"
