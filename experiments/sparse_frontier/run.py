"""``python -m experiments sparse_frontier``: accuracy and attention recall of a tiny long-context LM against
sparsity, for sparse prefill and sparse decode, at N and 2N (The Sparse Frontier, Nawrot et al., arXiv 2504.17768;
``../shared/papers/efficient.md`` §8).

The model is :mod:`experiments.longctx`'s (trained once per config and cached under ``runs/longctx/``). Every cell
(phase, pattern, N, target sparsity s) evaluates the same sequences (``samples_per_task`` per task, five tasks):

- prefill (:func:`experiments.longctx.infer.prefill_eval`): vertical-slash and FlexPrefill (token selections,
  budgets from ``for_sparsity(s, N)``), block top-k (``BlockTopK.for_sparsity``), and the static sink + window
  baseline with the vertical-slash budget;
- decode (:func:`experiments.longctx.infer.decode_eval`): Quest, the oracle top-k and the sink + window baseline,
  each reading ``(1 - s) * context`` keys (rounded to pages) per decode query.

It prints and writes (``--out``, default ``runs/sparse_frontier/<preset>/``): ``results.json`` (one row per cell:
answer-token accuracy, exact match, attention recall per layer, realised sparsity, per-task accuracy, seconds),
``table.md`` (with the paper's claims), ``accuracy.png`` / ``recall.png`` and ``verdict.txt``; the last line printed
is the verdict. Finished cells are kept in ``results.json``: ``--resume`` continues a killed sweep, ``--report``
rebuilds the outputs from it.
"""

from __future__ import annotations

import pathlib
import time
from typing import Sequence

from configs.sparse_frontier import PRESETS, SparseFrontierConfig
from experiments.common import config as config_lib
from experiments.common import report as report_lib

__all__ = ["main", "run", "plan", "verdict", "table"]

TOLERANCE = 0.95  # a sparsity is "tolerated" when accuracy stays >= TOLERANCE x the dense accuracy
MIN_DENSE = 0.3  # below this dense accuracy the trade-off is not testable
ESTIMATED_PREFILL = ("vertical_slash", "flexprefill", "block_topk")
PAPER = {
    "decode": "sparsity tolerated with accuracy guaranteed is higher in decoding than in prefilling (finding 2)",
    "length": "longer sequences tolerate higher sparsity; fixed-budget methods are suboptimal (finding 4)",
    "nowin": "no method wins across tasks and phases (finding 3)",
}


def plan(cfg: SparseFrontierConfig) -> list[tuple[str, str, int, float]]:
  """Every cell ``(phase, pattern, N, s)``; ``s = 0`` once per phase and length (pattern ``dense``)."""
  cells = []
  for n in cfg.lengths:
    for phase, pats in (("prefill", cfg.prefill_patterns), ("decode", cfg.decode_patterns)):
      cells.append((phase, "dense", n, 0.0))
      cells += [(phase, p, n, s) for p in pats for s in cfg.sparsities if s > 0]
  return cells


def _key(phase, pattern, n, s) -> str:
  return f"{phase}/{pattern}/N{n}/s{s:g}"


def _spec(cfg: SparseFrontierConfig, query_len: int, phase: str, pattern: str, n: int, s: float):
  """The :class:`PrefillPattern` / :class:`DecodePolicy` of a cell and a short description of its budget."""
  from experiments.longctx.infer import DecodePolicy, PrefillPattern
  from jaxattn import sparse

  if phase == "prefill":
    if pattern == "dense":
      return PrefillPattern(), "all causal pairs"
    kw = dict(last_q=min(cfg.last_q, n), force_first=cfg.force_first, force_local=cfg.force_local)
    if pattern == "block_topk":
      b = sparse.BlockTopK.for_sparsity(s, n, block_q=cfg.block, block_k=cfg.block, force_local=1)
      return PrefillPattern(b, cfg.block), f"top {b.top_k} of {n // cfg.block} blocks of {cfg.block}"
    vs = sparse.VerticalSlash.for_sparsity(s, n, **kw)
    if pattern == "vertical_slash":
      return PrefillPattern(vs), f"{vs.n_vertical} columns + {vs.n_slash} diagonals"
    if pattern == "flexprefill":
      fp = sparse.FlexPrefill.for_sparsity(s, n, alpha=cfg.flex_alpha, **kw)
      return PrefillPattern(fp), f"alpha {fp.alpha}, <= {fp.max_vertical} + {fp.max_slash}, min {fp.min_budget}"
    static = sparse.VerticalSlash(vs.n_vertical, vs.n_slash, last_q=kw["last_q"], force_first=vs.n_vertical,
                                  force_local=vs.n_slash)
    return PrefillPattern(static), f"first {vs.n_vertical} columns + {vs.n_slash} local diagonals"
  if pattern == "dense":
    return DecodePolicy(page_size=cfg.page_size), "all keys"
  ctx = n - query_len
  pg = cfg.page_size
  budget = max(pg, int(round((1.0 - s) * ctx / pg)) * pg)
  return DecodePolicy(pattern, budget, pg), f"{budget} of {ctx}+ keys"


def _data(cfg: SparseFrontierConfig, model_cfg, n: int):
  """``{task: (tokens, answer)}``: ``samples_per_task`` sequences of ``n`` tokens per task."""
  import numpy as np

  from experiments.longctx.tasks import LongCtxSource
  out = {}
  for t in model_cfg.data.tasks:
    src = LongCtxSource(n, cfg.samples_per_task, cfg.seed, model_cfg.data, tasks=(t,))
    out[t] = (np.asarray(src.arrays["tokens"]), np.asarray(src.arrays["answer"]))
  return out


def _eval_cell(model, data, spec, phase: str, query_len: int) -> dict:
  import numpy as np

  from experiments.longctx import infer
  correct = count = exact = 0
  per_task, rec, sp = {}, [], []
  for t, (toks, ans) in data.items():
    if phase == "prefill":
      r = infer.prefill_eval(model, toks, ans, spec)
    else:
      r = infer.decode_eval(model, toks, ans, query_len=query_len, policy=spec)
    correct += int(r["correct"].sum())
    count += int(r["count"].sum())
    exact += int(r["exact"].sum())
    per_task[t] = float(r["correct"].sum() / max(r["count"].sum(), 1))
    rec.append(r["recall"])
    sp.append(r["sparsity"])
  n_seq = sum(len(a) for a, _ in data.values())
  rec_l = np.mean(rec, 0)
  return dict(accuracy=correct / max(count, 1), exact=exact / max(n_seq, 1), answers=count, sequences=n_seq,
              recall=float(rec_l.mean()), recall_per_layer=[round(float(x), 4) for x in rec_l],
              sparsity=float(np.mean(sp)), per_task=per_task)


# ------------------------------------------------------------------------------------------------------ report
def _cells(rows: list[dict]) -> dict:
  return {(r["phase"], r["pattern"], r["N"], r["s"]): r for r in rows}


def _curve(cells, phase, pattern, n, sparsities):
  """``[(s, row)]`` for a pattern, ``s = 0`` from the dense row."""
  out = []
  for s in sparsities:
    r = cells.get((phase, "dense" if s == 0 else pattern, n, s))
    if r is not None:
      out.append((s, r))
  return out


def tolerated(cells, phase, pattern, n, sparsities) -> float | None:
  """The highest s such that every s' <= s keeps accuracy >= TOLERANCE x dense (None: missing cells)."""
  curve = _curve(cells, phase, pattern, n, sparsities)
  if len(curve) != len(sparsities):
    return None
  dense = curve[0][1]["accuracy"]
  best = 0.0
  for s, r in curve:
    if r["accuracy"] < TOLERANCE * dense:
      break
    best = s
  return best


def table(rows: list[dict], cfg: SparseFrontierConfig) -> str:
  """Markdown: per phase and N, accuracy / recall / realised sparsity against target s, one row per pattern."""
  cells = _cells(rows)
  ss = cfg.sparsities
  lines = []
  for phase, pats in (("prefill", cfg.prefill_patterns), ("decode", cfg.decode_patterns)):
    for n in cfg.lengths:
      lines.append(f"**{phase}, N = {n}** — answer-token accuracy / attention recall (realised sparsity)\n")
      lines.append("| pattern | " + " | ".join(f"s={s:g}" for s in ss) + " | tolerated s |")
      lines.append("|---|" + "---:|" * len(ss) + "---:|")
      for p in pats:
        vals = []
        for s in ss:
          r = cells.get((phase, "dense" if s == 0 else p, n, s))
          vals.append("—" if r is None else f"{r['accuracy']:.3f} / {r['recall']:.3f} ({r['sparsity']:.2f})")
        tol = tolerated(cells, phase, p, n, ss)
        lines.append(f"| {p} | " + " | ".join(vals) + f" | {'—' if tol is None else f'{tol:g}'} |")
      lines.append("")
  lines.append("Paper (The Sparse Frontier, abstract; exact per-task numbers not transcribed): "
               + "; ".join(PAPER.values()) + ".")
  lines.append(f"'tolerated s': the highest target sparsity up to which accuracy stays >= {TOLERANCE} x dense. "
               f"sink_window is the input-independent baseline with the same budget; decode topk is the oracle "
               f"(exact top keys of each query); s=0 is the dense model.")
  return "\n".join(lines)


def recall_notes(cells, cfg: SparseFrontierConfig) -> list[str]:
  """Attention recall (the dense mass kept) side by side: Quest decode vs the best estimated prefill pattern at
  each (N, s), and each pattern's recall at 2N vs N at equal s."""
  notes = []
  pre = [p for p in ESTIMATED_PREFILL if p in cfg.prefill_patterns]
  for n in cfg.lengths:
    for s in cfg.sparsities[1:]:
      q = cells.get(("decode", "quest", n, s))
      best = max((cells[("prefill", p, n, s)]["recall"], p) for p in pre if ("prefill", p, n, s) in cells) \
          if pre else None
      if q is not None and best is not None:
        notes.append(f"recall N={n} s={s:g}: Quest decode {q['recall']:.3f} vs best prefill {best[0]:.3f} "
                     f"({best[1]})")
  if len(cfg.lengths) >= 2:
    n1, n2 = cfg.lengths[0], cfg.lengths[-1]
    for ph, p in [("prefill", p) for p in pre] + [("decode", "quest")]:
      pairs = [(cells.get((ph, p, n1, s)), cells.get((ph, p, n2, s))) for s in cfg.sparsities[1:]]
      pairs = [(a["recall"], b["recall"]) for a, b in pairs if a is not None and b is not None]
      if pairs:
        up = sum(b >= a for a, b in pairs)
        notes.append(f"recall {ph} {p}: higher at N={n2} than at N={n1} for {up} of {len(pairs)} sparsities")
  return notes


def verdict(rows: list[dict], cfg: SparseFrontierConfig) -> tuple[str, list[str]]:
  """The one-line verdict and the per-claim findings (see the module docstring and :data:`PAPER`)."""
  cells = _cells(rows)
  ss = cfg.sparsities
  notes = []
  dense = {(ph, n): cells.get((ph, "dense", n, 0.0)) for ph in ("prefill", "decode") for n in cfg.lengths}
  if any(r is None for r in dense.values()):
    return "VERDICT: not reproduced — the sweep is incomplete (dense cells missing); rerun with --resume", notes
  notes += recall_notes(cells, cfg)
  low = [f"{ph} N={n}: {r['accuracy']:.2f}" for (ph, n), r in dense.items() if r["accuracy"] < MIN_DENSE]
  if low:
    return (f"VERDICT: not reproduced — not testable: the dense model's accuracy is below {MIN_DENSE} "
            f"({', '.join(low)}), so accuracy cannot show what sparsity costs (attention recall, which does not "
            f"need a capable model, is in the notes)"), notes
  # claim 1: decode (Quest) tolerates more sparsity than the best prefill pattern
  c1 = []
  for n in cfg.lengths:
    tp = [tolerated(cells, "prefill", p, n, ss) for p in ESTIMATED_PREFILL if p in cfg.prefill_patterns]
    tp = [t for t in tp if t is not None]
    td = tolerated(cells, "decode", "quest", n, ss) if "quest" in cfg.decode_patterns else None
    if tp and td is not None:
      c1.append(td > max(tp))
      notes.append(f"N={n}: Quest decode tolerates s={td:g}, the best prefill pattern s={max(tp):g}")
  claim1 = bool(c1) and all(c1)
  # claim 2: at equal s, the longer sequence keeps more of its dense accuracy (mean over s > 0)
  c2 = []
  if len(cfg.lengths) >= 2:
    n1, n2 = cfg.lengths[0], cfg.lengths[-1]
    for phase, pats in (("prefill", [p for p in ESTIMATED_PREFILL if p in cfg.prefill_patterns]),
                        ("decode", [p for p in ("quest",) if p in cfg.decode_patterns])):
      for p in pats:
        rel = []
        for n in (n1, n2):
          cur = _curve(cells, phase, p, n, ss)
          d = cur[0][1]["accuracy"] if cur else 0.0
          rel.append(sum(r["accuracy"] / d for s, r in cur if s > 0) / max(len(cur) - 1, 1) if d else 0.0)
        c2.append(rel[1] >= rel[0])
        notes.append(f"{phase} {p}: mean accuracy kept over s > 0 is {rel[0]:.2f} at N={n1}, {rel[1]:.2f} at "
                     f"N={n2}")
      # equal absolute budget: s at 2N with the same number of keys as s1 at N
      for p in pats:
        for s1 in ss:
          s2 = round(1 - (1 - s1) / (n2 / n1), 6)
          a, b = cells.get((phase, p, n1, s1)), cells.get((phase, p, n2, s2))
          if s1 > 0 and a is not None and b is not None:
            notes.append(f"{phase} {p}, same budget: accuracy {a['accuracy']:.2f} at N={n1} s={s1:g} vs "
                         f"{b['accuracy']:.2f} at N={n2} s={s2:g}")
  claim2 = bool(c2) and sum(c2) > len(c2) / 2
  why1 = "decode tolerates more sparsity than prefill" + ("" if claim1 else " does NOT hold") + \
      f" ({'; '.join(n for n in notes if n.startswith('N='))})"
  why2 = (f"longer sequences keep more accuracy at equal s for {sum(c2)} of {len(c2)} patterns")
  if claim1 and claim2:
    head = "reproduced"
  elif claim1 or claim2:
    head = "partly"
  else:
    head = "not reproduced"
  return f"VERDICT: {head} — {why1}; {why2} (tiny 4-layer model, synthetic retrieval tasks)", notes


def _plots(rows, cfg, out: pathlib.Path) -> None:
  from experiments.common.plots import line_panels
  cells = _cells(rows)
  for metric, fname, label in (("accuracy", "accuracy.png", "answer-token accuracy"),
                               ("recall", "recall.png", "attention recall")):
    panels = {}
    for phase, pats in (("prefill", cfg.prefill_patterns), ("decode", cfg.decode_patterns)):
      for n in cfg.lengths:
        series = {}
        for p in pats:
          cur = _curve(cells, phase, p, n, cfg.sparsities)
          if cur:
            series[p] = ([s for s, _ in cur], [r[metric] for _, r in cur])
        panels[f"{phase}, N={n}"] = series
    line_panels(panels, out / fname, xlabel="target sparsity s", ylabel=label, ylim=(-0.02, 1.02),
                title=f"sparse_frontier ({cfg.name}): {label} vs sparsity")


def run(cfg: SparseFrontierConfig, out: str | pathlib.Path, *, resume: bool = False, report: bool = False,
        progress: bool = True, model_root: str | pathlib.Path | None = None, verbose: bool = True,
        explicit_out: bool = True) -> dict:
  """Runs (or resumes, or only reports) the sweep; returns the ``results.json`` content."""
  from configs.longctx import get_config

  out = pathlib.Path(out)
  model_cfg = get_config(cfg.model)
  fp = config_lib.fingerprint({"sweep": cfg, "model": model_cfg})
  old = report_lib.prepare_out_dir(out, fingerprint=fp, resume=resume, report=report,
                                   explicit_out=explicit_out)
  rows = list(old["rows"]) if old else []
  payload = dict(preset=cfg.name, fingerprint=fp, config=config_lib.to_dict(cfg),
                 model_config=config_lib.to_dict(model_cfg), environment=report_lib.environment(), rows=rows,
                 train=old.get("train", {}) if old else {})
  if not report:
    for n in cfg.lengths:
      if n > model_cfg.train.train_len:
        raise config_lib.ConfigError(f"length {n} exceeds the model's training length {model_cfg.train.train_len} "
                                     f"(RoPE does not extrapolate); use lengths <= it")
    from tqdm.auto import tqdm

    from experiments.longctx.train import load_or_train
    t0, c0 = time.time(), time.process_time()
    trained = load_or_train(model_cfg, root=model_root, progress=progress)
    payload["train"] = dict(directory=str(trained.directory), cached=trained.cached,
                            seconds=round(trained.train_seconds, 1), history=trained.history) \
        if not trained.cached or not payload["train"] else payload["train"]
    done = {_key(r["phase"], r["pattern"], r["N"], r["s"]) for r in rows}
    todo = [c for c in plan(cfg) if _key(*c) not in done]
    if done and verbose:
      print(f"resumed: {len(done)} of {len(done) + len(todo)} cells already finished in {out}/", flush=True)
    bar = tqdm(total=len(todo), unit="cell", disable=not progress or not todo, dynamic_ncols=True,
               bar_format="{desc} |{bar}| elapsed {elapsed}, ETA {remaining}")
    data = {}
    q_len = model_cfg.data.query_len
    for k, (phase, pattern, n, s) in enumerate(todo):
      bar.set_description(f"sparse_frontier: run {k + 1} of {len(todo)} ({phase} {pattern} N={n} s={s:g})")
      if n not in data:
        data = {n: _data(cfg, model_cfg, n)}
      t1 = time.time()
      spec, budget = _spec(cfg, q_len, phase, pattern, n, s)
      row = dict(phase=phase, pattern=pattern, N=n, s=s, budget=budget,
                 **_eval_cell(trained.model, data[n], spec, phase, q_len), seconds=round(time.time() - t1, 1))
      rows.append(row)
      report_lib.write_json(out / "results.json", payload)
      bar.update(1)
    bar.close()
    payload["eval_seconds"] = round(time.time() - t0, 1)
    payload["cpu_seconds"] = round(time.process_time() - c0, 1)
  md = table(rows, cfg)
  line, notes = verdict(rows, cfg)
  payload.update(table_markdown=md, verdict=line, notes=notes)
  report_lib.write_json(out / "results.json", payload)
  tr = payload.get("train", {})
  head = (f"# The Sparse Frontier at toy scale, preset {cfg.name}\n\nModel: longctx preset `{cfg.model}` "
          f"({model_cfg.model.num_layers} layers, d={model_cfg.model.d_model}, trained at "
          f"{model_cfg.train.train_len} tokens, {model_cfg.train.steps} steps; {tr.get('directory', '?')}). "
          f"{cfg.samples_per_task} sequences per task x {len(model_cfg.data.tasks)} tasks per cell.\n\n")
  (out / "table.md").write_text(head + md + "\n\n" + "\n".join(f"- {n}" for n in notes) + f"\n\n{line}\n")
  (out / "verdict.txt").write_text(line + "\n")
  _plots(rows, cfg, out)
  if verbose:
    print(f"\noutputs in {out}/ (results.json, table.md, accuracy.png, recall.png, verdict.txt)\n")
    print(md + "\n\n" + "\n".join(f"- {n}" for n in notes) + f"\n\n{line}", flush=True)
  return payload


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m experiments sparse_frontier``: see :func:`experiments.common.report.preset_main`."""
  return report_lib.preset_main("sparse_frontier", __doc__, PRESETS, run, argv, model_root=True)
