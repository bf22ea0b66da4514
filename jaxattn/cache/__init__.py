"""``jaxattn.cache``: a KV-cache pytree for batched decoding and KV eviction / selection policies over it.

- :class:`KVCache` (``k [B, L_max, G, D]``, ``v [B, L_max, G, E]``, per-sequence ``lengths``; optional Quest page
  bounds; per-(slot, kv head) ``positions`` / ``valid`` once compressed), :func:`init`, :func:`prefill` (chunked),
  :func:`append` (decode step), :func:`attend` (via :func:`jaxattn.softmax_attention`), :func:`decode_with_probs`
  (dense XLA attention that also returns the probability rows), :func:`gather` (keep a per-head selection).
- Policies (pure, jit-able, static budgets): :func:`streaming_llm`, :func:`h2o`, :func:`snapkv_compress`,
  :func:`ada_snapkv_compress`, :func:`quest_select` / :func:`quest_attend`, :func:`select_topk_from_probs`; each
  ``*_select`` returns the ``(index, valid)`` selection the compressing function keeps.
- Recycled Attention / RefreshKV: :class:`RecycledKVCache`, :func:`recycled_init`, :func:`recycled_decode_step`.
- :mod:`jaxattn.cache.policy`: the same methods as frozen settings (``StreamingLLM``, ``H2O``, ``SnapKV``,
  ``AdaSnapKV``, ``Quest``, ``Recycled``) for modules that own their cache:
  ``jaxattn.nn.MultiHeadAttention.init_cache(..., policy=SnapKV(capacity=256))``.
- :mod:`jaxattn.cache.reference`: numpy references of every selection (used by the tests).

See :mod:`jaxattn.cache.kv` for the layout and the capacity rules.
"""

from jaxattn.cache import policy as policy
from jaxattn.cache.kv import KVCache as KVCache
from jaxattn.cache.kv import append as append
from jaxattn.cache.kv import attend as attend
from jaxattn.cache.kv import decode_with_probs as decode_with_probs
from jaxattn.cache.kv import gather as gather
from jaxattn.cache.kv import init as init
from jaxattn.cache.kv import prefill as prefill
from jaxattn.cache.kv import visible as visible
from jaxattn.cache.policies import ada_snapkv_compress as ada_snapkv_compress
from jaxattn.cache.policies import ada_snapkv_select as ada_snapkv_select
from jaxattn.cache.policies import attention_scores as attention_scores
from jaxattn.cache.policies import h2o as h2o
from jaxattn.cache.policies import h2o_scores as h2o_scores
from jaxattn.cache.policies import h2o_select as h2o_select
from jaxattn.cache.policies import quest_attend as quest_attend
from jaxattn.cache.policies import quest_key_mask as quest_key_mask
from jaxattn.cache.policies import quest_scores as quest_scores
from jaxattn.cache.policies import quest_select as quest_select
from jaxattn.cache.policies import select_topk_from_probs as select_topk_from_probs
from jaxattn.cache.policies import snapkv_compress as snapkv_compress
from jaxattn.cache.policies import snapkv_scores as snapkv_scores
from jaxattn.cache.policies import snapkv_select as snapkv_select
from jaxattn.cache.policies import streaming_llm as streaming_llm
from jaxattn.cache.policies import streaming_llm_select as streaming_llm_select
from jaxattn.cache.recycled import RecycledKVCache as RecycledKVCache
from jaxattn.cache.recycled import recycled_decode_step as recycled_decode_step
from jaxattn.cache.recycled import recycled_init as recycled_init
