"""HaloNet's blocked local 2-D self-attention with halo (Vaswani et al. 2021, ``../shared/papers/efficient.md`` §7).

- :func:`halo_attention`: ``"xla"`` (blocked, windows gathered, no ``T x T`` array), ``"reference"`` (dense
  definition) and ``"mask"`` (:func:`jaxattn.softmax_attention` with :class:`HaloMask`), with 2-D factorised
  relative positions and a choice of how the image border is padded.
- :class:`HaloMask`: the halo window as a static :mod:`jaxattn.masks` mask over the flattened image.
- :func:`relative_position_bias`: the dense ``[B, H, T, T]`` relative logits (the ``"mask"`` path's bias).
"""

from jaxattn.ops.halo.api import IMPLEMENTATIONS as IMPLEMENTATIONS
from jaxattn.ops.halo.api import halo_attention as halo_attention
from jaxattn.ops.halo.api import relative_position_bias as relative_position_bias
from jaxattn.ops.halo.mask import HaloMask as HaloMask
from jaxattn.ops.halo.mask import num_rel_positions as num_rel_positions
