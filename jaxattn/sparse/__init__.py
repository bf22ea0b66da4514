"""``jaxattn.sparse``: training-free sparse-prefill index builders, attention recall and realised sparsity.

The builders (:class:`VerticalSlash`, :class:`FlexPrefill`, :class:`BlockTopK`, frozen dataclasses of static
settings with ``.build(q, k, *, block_q, block_k) -> BlockIndex``) produce the kv block lists that
:func:`jaxattn.block_sparse_attention` runs; :func:`sparse_attention` runs them with the causal mask.
:func:`attention_recall` measures the dense softmax mass a selection keeps, :func:`sparsity` the fraction of
causal pairs it skips; ``for_sparsity`` class methods pick budgets for a target sparsity (``s = 0``: dense).
:mod:`jaxattn.sparse.reference` holds numpy references of every selection. See :mod:`jaxattn.sparse.index`.
"""

from jaxattn.sparse import reference as reference
from jaxattn.sparse.index import BlockIndex as BlockIndex
from jaxattn.sparse.index import BlockTopK as BlockTopK
from jaxattn.sparse.index import FlexPrefill as FlexPrefill
from jaxattn.sparse.index import VerticalSlash as VerticalSlash
from jaxattn.sparse.index import VerticalSlashSelection as VerticalSlashSelection
from jaxattn.sparse.index import block_topk_index as block_topk_index
from jaxattn.sparse.index import causal_mask as causal_mask
from jaxattn.sparse.index import flexprefill_index as flexprefill_index
from jaxattn.sparse.index import sparse_attention as sparse_attention
from jaxattn.sparse.index import vertical_slash_index as vertical_slash_index
from jaxattn.sparse.recall import Recall as Recall
from jaxattn.sparse.recall import Sparsity as Sparsity
from jaxattn.sparse.recall import attention_recall as attention_recall
from jaxattn.sparse.recall import sparsity as sparsity
