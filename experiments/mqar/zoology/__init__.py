"""Zoology (Arora et al. 2023) in Flax NNX: the sequence mixers of the recall study and the 2-layer LM scaffold.

- :class:`ZooLM`: embedding, pre-LN blocks with a sequence mixer and an identity state mixer, tied head.
- Mixers (``x [B, T, D] -> [B, T, D]``, causal): :class:`SoftmaxAttention` (full or sliding window),
  :class:`BaseConv` (:class:`ShortConv` / :class:`LongConv` with an :class:`ImplicitFilter`),
  :class:`DecayedLinearAttention` (TransNormer), :class:`TaylorLinearAttention` (Based),
  :class:`SigmoidSelectiveAttention` (input-dependent sparse attention), :class:`Sequential`.
- :func:`make_mixer` / :data:`MIXERS`: the per-layer mixer of each family, as used by ``python -m experiments mqar``.
"""

from experiments.mqar.zoology.conv import BaseConv as BaseConv
from experiments.mqar.zoology.conv import ImplicitFilter as ImplicitFilter
from experiments.mqar.zoology.conv import LongConv as LongConv
from experiments.mqar.zoology.conv import ShortConv as ShortConv
from experiments.mqar.zoology.conv import fft_causal_conv as fft_causal_conv
from experiments.mqar.zoology.mixers import DecayedLinearAttention as DecayedLinearAttention
from experiments.mqar.zoology.mixers import Mixer as Mixer
from experiments.mqar.zoology.mixers import Sequential as Sequential
from experiments.mqar.zoology.mixers import SigmoidSelectiveAttention as SigmoidSelectiveAttention
from experiments.mqar.zoology.mixers import SoftmaxAttention as SoftmaxAttention
from experiments.mqar.zoology.mixers import TaylorLinearAttention as TaylorLinearAttention
from experiments.mqar.zoology.mixers import taylor_features as taylor_features
from experiments.mqar.zoology.model import MIXERS as MIXERS
from experiments.mqar.zoology.model import ZooLM as ZooLM
from experiments.mqar.zoology.model import make_mixer as make_mixer
from experiments.mqar.zoology.model import zoology_init as zoology_init
