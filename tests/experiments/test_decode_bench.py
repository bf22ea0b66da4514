"""``python -m experiments decode_bench`` on its test preset: rows for every case, table, plot, verdict; presets
validate."""

import json

import pytest

from configs import decode_bench as cfg
from experiments.decode_bench import run


def test_test_preset_end_to_end(tmp_path, capsys):
  assert run.main(["--preset", "test", "--out", str(tmp_path), "--no-progress"]) == 0
  rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  p = cfg.PRESETS["test"]
  assert len(rows) == len(p.lengths) * (1 + len(run.backends()) * (1 + len(p.layouts)))
  assert {r["layout"] for r in rows} == {"dense", "pages", "tokens"}
  assert all(r["ms"] > 0 and r["keys"] in (r["L"], r["L"] // p.sparse_ratio) for r in rows)
  assert (tmp_path / "decode_time.png").stat().st_size > 0
  out = capsys.readouterr().out
  assert "verdict: " in out and "sparse/dense" in out


def test_page_index_selects_whole_pages():
  p = cfg.PRESETS["test"]
  _, _, _, _, index = run.make_case(p, 1024)
  pages = index["pages"]
  assert pages.shape == (p.B, p.G, 1024 // p.sparse_ratio)
  starts = pages[..., ::p.page]
  assert (starts % p.page == 0).all() and (pages[..., p.page - 1::p.page] == starts + p.page - 1).all()
  assert (index["tokens"][..., 1:] > index["tokens"][..., :-1]).all()  # sorted, distinct


@pytest.mark.parametrize("kw, match", [
    (dict(lengths=(1000,)), "multiple of page"), (dict(lengths=(1024,), H=6, G=4), "not a multiple"),
    (dict(lengths=(1024,), dtype="float16"), "dtype"), (dict(lengths=(1024,), layouts=("rows",)), "unknown layout"),
])
def test_bad_presets(kw, match):
  with pytest.raises(ValueError, match=match):
    cfg.DecodeBenchPreset("x", **kw)
