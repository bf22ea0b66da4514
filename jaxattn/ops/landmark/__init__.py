"""Landmark attention (Mohtashami & Jaggi 2023): grouped softmax, data helpers, retrieval inference.

- :func:`landmark_attention`: the grouped softmax over landmark blocks (``"reference"``, ``"xla"``,
  ``"pallas_gpu"``, ``"pallas_tpu"``).
- :mod:`jaxattn.ops.landmark.data`: insert landmark tokens, map outputs / labels back.
- :class:`LandmarkCache`, :func:`landmark_retrieval_attention`: chunked inference with top-k block retrieval.
"""

from jaxattn.ops.landmark import data as data
from jaxattn.ops.landmark.api import landmark_attention as landmark_attention
from jaxattn.ops.landmark.config import LandmarkCall as LandmarkCall
from jaxattn.ops.landmark.config import LandmarkResiduals as LandmarkResiduals
from jaxattn.ops.landmark.config import PallasGpuConfig as PallasGpuConfig
from jaxattn.ops.landmark.config import PallasTpuConfig as PallasTpuConfig
from jaxattn.ops.landmark.config import XlaConfig as XlaConfig
from jaxattn.ops.landmark.retrieval import LandmarkCache as LandmarkCache
from jaxattn.ops.landmark.retrieval import landmark_retrieval_attention as landmark_retrieval_attention
