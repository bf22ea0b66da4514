"""Attention-guided visual-token pruning: scorer -> transforms -> selection -> executor
(FasterVLM, Attention Debiasing, AdaptInfer; ``../shared/papers/cross.md`` §10, §11, §17, §22-B).

Scorers read the softmax backends' statistics mode (:func:`jaxattn.analysis.attention_stats`), never a ``T x S``
probability matrix::

    from jaxattn import prune
    scores = prune.cls_attention(q_vit, k_vit)                               # [B, N] FasterVLM
    scores = prune.text_to_visual(q_text, k_vis, k_text)                      # [B, V] AdaptInfer
    trend = prune.fit_position_trend(calib_scores, valid=~pad)                # debiasing, log space, non-pad
    scores = prune.suppress(prune.positional_detrend(scores, trend), pad)
    idx = prune.topk_keep_order(scores, prune.keep_count(N, 0.1))            # [B, k] ascending
    x_kept = prune.gather_keep(x, idx)                                        # or segment ids:
    ids = prune.prune_segment_ids(prune.keep_mask(idx, N), num_text=T)

Modules: :mod:`~jaxattn.prune.scorers`, :mod:`~jaxattn.prune.transforms`, :mod:`~jaxattn.prune.select`,
:mod:`~jaxattn.prune.execute`.
"""

from jaxattn.prune.execute import compose as compose
from jaxattn.prune.execute import gather_keep as gather_keep
from jaxattn.prune.execute import keep_mask as keep_mask
from jaxattn.prune.execute import prune_segment_ids as prune_segment_ids
from jaxattn.prune.scorers import WEIGHTINGS as WEIGHTINGS
from jaxattn.prune.scorers import cls_attention as cls_attention
from jaxattn.prune.scorers import feature_norm as feature_norm
from jaxattn.prune.scorers import oracle_scores as oracle_scores
from jaxattn.prune.scorers import random_scores as random_scores
from jaxattn.prune.scorers import row_attention as row_attention
from jaxattn.prune.scorers import text_importance as text_importance
from jaxattn.prune.scorers import text_to_visual as text_to_visual
from jaxattn.prune.select import PruningSchedule as PruningSchedule
from jaxattn.prune.select import attention_shift as attention_shift
from jaxattn.prune.select import inflection_layers as inflection_layers
from jaxattn.prune.select import keep_count as keep_count
from jaxattn.prune.select import topk_keep_order as topk_keep_order
from jaxattn.prune.transforms import PositionTrend as PositionTrend
from jaxattn.prune.transforms import fit_position_trend as fit_position_trend
from jaxattn.prune.transforms import positional_detrend as positional_detrend
from jaxattn.prune.transforms import suppress as suppress
