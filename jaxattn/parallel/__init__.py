"""Context parallelism: one long sequence spread over many devices, exact (``jax.sharding`` + ``shard_map``).

Public surface::

    context_parallel_attention(q, k, v, mesh=..., seq_axis=..., strategy="ring" | "all_gather" | "ulysses" | "usp",
                               mask=..., segment_ids=..., load_balance="zigzag")
    context_parallel_linear_attention(q, k, v, mesh=..., seq_axis=..., log_decay=...)
    zigzag_permute / zigzag_unpermute / zigzag_indices           # global reorderings (any array)
    zigzag_permute_local / zigzag_unpermute_local                # inside shard_map (two ppermutes)
    merge_attention(out_a, lse_a, out_b, lse_b)                  # online-softmax merge of partial results

Every function also runs inside a caller's own ``shard_map`` when given ``axis_name=`` instead of ``mesh=``.
Multi-device speed in this project is modelled (``python -m experiments cp_model``), not measured.
"""

from jaxattn.parallel.api import STRATEGIES as STRATEGIES
from jaxattn.parallel.api import context_parallel_attention as context_parallel_attention
from jaxattn.parallel.linear import context_parallel_linear_attention as context_parallel_linear_attention
from jaxattn.parallel.ring import merge_attention as merge_attention
from jaxattn.parallel.zigzag import zigzag_indices as zigzag_indices
from jaxattn.parallel.zigzag import zigzag_permute as zigzag_permute
from jaxattn.parallel.zigzag import zigzag_permute_local as zigzag_permute_local
from jaxattn.parallel.zigzag import zigzag_unpermute as zigzag_unpermute
from jaxattn.parallel.zigzag import zigzag_unpermute_local as zigzag_unpermute_local
