"""Attention analysis and interventions: capture, statistics, rollout, saliency, head masks, ACT, retrieval heads.

Capture and interventions (NNX models; flax is imported only when these are called):

- :func:`capture` — ``with analysis.capture(model, stats=("probs",) | ("colsum", "rowmax", "argmax", ...)) as rec``
  records, per layer (module path) and head, the attention probabilities or only blockwise statistics of every
  :class:`jaxattn.nn.MultiHeadAttention` and ``flax.nnx.MultiHeadAttention(attention_fn=as_attention_fn(...))``
  call, eagerly or (through ``rec.wrap(fn)``) under ``jit`` (:mod:`jaxattn.analysis.capture` documents the jit
  story).
- :func:`intervene` with :class:`HeadMask` (``"uniform"`` / ``"zero"``), a probability hook, :class:`ACT`;
  :class:`LayerHook` is the per-module setting (also a ``MultiHeadAttention(analysis_hook=...)`` argument).

Statistics without ``T x S``: :func:`attention_stats` (column sums, counts, row maxima, argmax, entropy, lse;
``"xla"`` blockwise, the Pallas statistics kernels ``"pallas_tpu"`` / ``"pallas_gpu"``, or ``"reference"``)
and the dense :func:`attention_probs` for small shapes.

Pure functions (no flax): :func:`aggregate`, :func:`rollout`, :func:`entropy`, :func:`top_k_mass`,
:func:`mass_count`, :func:`gini`, :func:`sink_scores`, :func:`column_scores`, :func:`pearson`, :func:`spearman`,
:func:`position_profile`, :func:`distance_profile`; saliency :func:`grad_x_input`, :func:`integrated_gradients`;
ACT :func:`act_calibrate` (matrix form), :func:`act_attention` (fused blockwise form), :func:`act_row_bias`,
:func:`act_sinks`; retrieval heads :func:`retrieval_scores`, :func:`argmax_steps`, :func:`needle_task`,
:func:`rouge1_recall`, :func:`rank_heads`, :func:`top_heads`, :func:`random_heads`, :func:`search_heads`.
"""

from jaxattn.analysis.act import act_attention as act_attention
from jaxattn.analysis.act import act_calibrate as act_calibrate
from jaxattn.analysis.act import act_row_bias as act_row_bias
from jaxattn.analysis.act import act_sinks as act_sinks
from jaxattn.analysis.capture import Capture as Capture
from jaxattn.analysis.capture import Records as Records
from jaxattn.analysis.capture import attention_layers as attention_layers
from jaxattn.analysis.capture import capture as capture
from jaxattn.analysis.capture import intervene as intervene
from jaxattn.analysis.hooks import ACT as ACT
from jaxattn.analysis.hooks import CAPTURABLE as CAPTURABLE
from jaxattn.analysis.hooks import HeadMask as HeadMask
from jaxattn.analysis.hooks import LayerHook as LayerHook
from jaxattn.analysis.metrics import aggregate as aggregate
from jaxattn.analysis.metrics import column_scores as column_scores
from jaxattn.analysis.metrics import distance_profile as distance_profile
from jaxattn.analysis.metrics import entropy as entropy
from jaxattn.analysis.metrics import gini as gini
from jaxattn.analysis.metrics import mass_count as mass_count
from jaxattn.analysis.metrics import pearson as pearson
from jaxattn.analysis.metrics import position_profile as position_profile
from jaxattn.analysis.metrics import rollout as rollout
from jaxattn.analysis.metrics import sink_scores as sink_scores
from jaxattn.analysis.metrics import spearman as spearman
from jaxattn.analysis.metrics import top_k_mass as top_k_mass
from jaxattn.analysis.retrieval import HeadSearch as HeadSearch
from jaxattn.analysis.retrieval import argmax_steps as argmax_steps
from jaxattn.analysis.retrieval import NeedleBatch as NeedleBatch
from jaxattn.analysis.retrieval import RetrievalScores as RetrievalScores
from jaxattn.analysis.retrieval import needle_task as needle_task
from jaxattn.analysis.retrieval import random_heads as random_heads
from jaxattn.analysis.retrieval import rank_heads as rank_heads
from jaxattn.analysis.retrieval import retrieval_scores as retrieval_scores
from jaxattn.analysis.retrieval import rouge1_recall as rouge1_recall
from jaxattn.analysis.retrieval import search_heads as search_heads
from jaxattn.analysis.retrieval import top_heads as top_heads
from jaxattn.analysis.saliency import grad_x_input as grad_x_input
from jaxattn.analysis.saliency import integrated_gradients as integrated_gradients
from jaxattn.ops.softmax.stats import STATS as STATS
from jaxattn.ops.softmax.stats import attention_probs as attention_probs
from jaxattn.ops.softmax.stats import attention_stats as attention_stats
