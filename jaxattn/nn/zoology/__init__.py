"""Zoology (Arora et al. 2023) in Flax NNX: the sequence mixers of the recall study and the 2-layer LM scaffold.

- :class:`ZooLM`: embedding, pre-LN blocks with a sequence mixer and an identity state mixer, tied head.
- Mixers (``x [B, T, D] -> [B, T, D]``, causal): :class:`SoftmaxAttention` (full or sliding window),
  :class:`BaseConv` (:class:`ShortConv` / :class:`LongConv` with an :class:`ImplicitFilter`),
  :class:`DecayedLinearAttention` (TransNormer), :class:`TaylorLinearAttention` (Based),
  :class:`SigmoidSelectiveAttention` (input-dependent sparse attention), :class:`Sequential`.
- :func:`make_mixer` / :data:`MIXERS`: the per-layer mixer of each family, as used by ``python -m experiments mqar``.
"""

from jaxattn.nn.zoology.conv import BaseConv as BaseConv
from jaxattn.nn.zoology.conv import ImplicitFilter as ImplicitFilter
from jaxattn.nn.zoology.conv import LongConv as LongConv
from jaxattn.nn.zoology.conv import ShortConv as ShortConv
from jaxattn.nn.zoology.conv import fft_causal_conv as fft_causal_conv
from jaxattn.nn.zoology.mixers import DecayedLinearAttention as DecayedLinearAttention
from jaxattn.nn.zoology.mixers import Mixer as Mixer
from jaxattn.nn.zoology.mixers import Sequential as Sequential
from jaxattn.nn.zoology.mixers import SigmoidSelectiveAttention as SigmoidSelectiveAttention
from jaxattn.nn.zoology.mixers import SoftmaxAttention as SoftmaxAttention
from jaxattn.nn.zoology.mixers import TaylorLinearAttention as TaylorLinearAttention
from jaxattn.nn.zoology.mixers import taylor_features as taylor_features
from jaxattn.nn.zoology.model import MIXERS as MIXERS
from jaxattn.nn.zoology.model import ZooLM as ZooLM
from jaxattn.nn.zoology.model import make_mixer as make_mixer
from jaxattn.nn.zoology.model import zoology_init as zoology_init
