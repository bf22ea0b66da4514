"""experiments.common.attention_plots: every helper writes a non-empty PNG and rejects malformed input."""

import numpy as np
import pytest

from experiments.common import attention_plots as ap


def _png(path):
  data = path.read_bytes()
  return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_helper_writes_a_png(tmp_path):
  rng = np.random.default_rng(0)
  maps = {f"head {h}": rng.dirichlet(np.ones(6), size=5) for h in range(3)}
  assert _png(ap.heatmaps(maps, tmp_path / "a" / "maps.png", xticks=list("abcdef"), yticks=list("vwxyz"), cols=2))
  assert _png(ap.head_grid(rng.normal(size=(3, 4)), tmp_path / "grid.png", center=0.0, fmt="{:+.1f}"))
  assert _png(ap.head_grid(rng.random((2, 2)), tmp_path / "grid2.png"))
  assert _png(ap.profiles({"a": ([0, 1, 2], [0.2, 0.3, 0.5])}, tmp_path / "prof.png", xlabel="x", ylabel="y"))
  assert _png(ap.profiles({}, tmp_path / "prof2.png", xlabel="x", ylabel="y",
                          panels={"short": {"a": ([0, 1], [1, 2])}, "long": {"a": ([0, 1], [2, 1])}}))
  assert _png(ap.histogram({"scores": rng.random(50), "nan ignored": [np.nan, 0.5]}, tmp_path / "h.png",
                           threshold=0.1, log_y=True))


def test_bad_input_is_named(tmp_path):
  with pytest.raises(ValueError, match="at least one map"):
    ap.heatmaps({}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="'m' must be 2-D"):
    ap.heatmaps({"m": np.zeros(3)}, tmp_path / "x.png")
  with pytest.raises(ValueError, match=r"\[L, H\]"):
    ap.head_grid(np.zeros(3), tmp_path / "x.png")
  with pytest.raises(ValueError, match="finite"):
    ap.histogram({"a": [np.nan]}, tmp_path / "x.png")
  assert not (tmp_path / "x.png").exists()
