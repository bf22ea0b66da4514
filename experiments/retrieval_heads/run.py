"""``python -m experiments retrieval_heads``: retrieval heads of a tiny decoder trained on a needle-copy task
(Retrieval Head Mechanistically Explains Long-Context Factuality, Wu et al., arXiv 2404.15574;
``../shared/papers/efficient.md`` §9).

Steps (:mod:`experiments.retrieval_heads.lm` holds the task, the model and the decode loop):

1. train the decoder with :func:`experiments.common.train.fit` (Orbax checkpoints under ``<out>/ckpt``; a killed
   run resumes);
2. retrieval scores of every (layer, head) over the detection prompts, exactly as the official detection loop
   (:func:`jaxattn.analysis.retrieval_scores`: top-1 attention of each decode step on the needle token being
   copied; samples kept when ROUGE-1 recall > 0.5); histogram and heat map, fraction of heads above 0.1;
3. needle exact match and ROUGE-1 recall on the test prompts with no head masked, the top-k heads masked, and k
   random heads (drawn outside the top ``exclude_top``) masked, ``k in ks``; masking is ``HeadMask`` mode
   ``"uniform"`` (the query zeroed, as the paper) during decoding only;
4. the attention map of the top head on one test prompt.

Outputs (``--out``, default ``runs/retrieval_heads/<preset>/``): ``metrics.jsonl``, ``results.json`` (one row per
masking cell), ``table.md``, ``scores.png``, ``masking.png``, ``attention.png``, ``verdict.txt``; the last line
printed is the verdict. ``--resume`` continues a killed run (training from its checkpoint, finished cells kept);
``--report`` rebuilds the outputs from ``results.json``.
"""

from __future__ import annotations

import pathlib
import time
from typing import Sequence

from configs.retrieval_heads import PRESETS, RetrievalHeadsConfig
from experiments.common import config as config_lib
from experiments.common import report as report_lib

__all__ = ["main", "run", "plan", "verdict", "table"]

PAPER = {
    "sparse": "< 5% of heads score > 0.1 (3-6% across Llama-2, Yi, Qwen, Mistral; §9b)",
    "mask": "masking the top retrieval heads collapses needle retrieval, masking random heads barely matters "
            "(README figure: top-30 vs random-30 of 1024)",
}
MIN_BASE = 0.3  # below this unmasked exact match, masking cannot show a collapse
SPARSE_MAX = 0.10  # the sparsity bar at toy scale (efficient.md §9c: "<= 5-10% of heads above 0.1")


def plan(cfg: RetrievalHeadsConfig) -> list[tuple[str, int, int]]:
  """Every masking cell ``(method, k, draw)``: ``("none", 0, 0)``, then per k ``top`` and ``random`` draws."""
  cells = [("none", 0, 0)]
  for k in cfg.ks:
    cells.append(("top", k, 0))
    cells += [("random", k, d) for d in range(cfg.random_draws)]
  return cells


def _key(method, k, draw) -> str:
  return f"{method}/k{k}/d{draw}"


def _heads_for(cfg, scores, method, k, draw) -> frozenset:
  from jaxattn import analysis
  if method == "none":
    return frozenset()
  if method == "top":
    return analysis.top_heads(scores, k)
  return analysis.random_heads(scores, k, seed=draw, exclude_top=cfg.exclude_top)


def _evaluate(model, batch, steps, heads, mode) -> dict:
  import numpy as np

  from experiments.retrieval_heads import lm
  from jaxattn import analysis
  hm = analysis.HeadMask(heads, mode) if heads else None
  gen, _ = lm.generate(model, batch.tokens, steps, head_mask=hm)
  rouge = [analysis.rouge1_recall(a, g) for a, g in zip(batch.answer, gen)]
  return dict(exact=float(np.mean((gen == batch.answer).all(1))), rouge1=float(np.mean(rouge)))


# ------------------------------------------------------------------------------------------------------ report
def _summary(rows, cfg):
  """``{k: {"top": row, "random": [rows]}}`` and the unmasked row."""
  base = next((r for r in rows if r["method"] == "none"), None)
  per_k = {k: {"top": None, "random": []} for k in cfg.ks}
  for r in rows:
    if r["method"] == "top":
      per_k[r["k"]]["top"] = r
    elif r["method"] == "random":
      per_k[r["k"]]["random"].append(r)
  return base, per_k


def _mean(rs, f):
  return sum(r[f] for r in rs) / len(rs) if rs else float("nan")


def table(payload: dict, cfg: RetrievalHeadsConfig) -> str:
  """Markdown: the score summary, then exact match / ROUGE-1 recall per k for none / top-k / random-k."""
  sc = payload.get("scores")
  lines = []
  if sc is not None:
    n_heads = cfg.model.num_layers * cfg.model.num_heads
    top = ", ".join(f"L{l}H{h} {s:.3f}" for (l, h), s in sc["top"][:5])
    lines += [
        "**Retrieval scores** (official definition, over "
        f"{sc['kept']} of {sc['prompts']} detection prompts kept by ROUGE-1 recall > 0.5)\n",
        "| quantity | ours | paper |", "|---|---:|---:|",
        f"| heads with score > {cfg.threshold:g} | {sc['above']} of {n_heads} ({100 * sc['fraction']:.1f}%) | "
        f"< 5% (3-6%) |",
        f"| best score | {sc['max']:.3f} | 0.94 (Llama-2-7B-80K L16H19) |",
        f"| mean score | {sc['mean']:.3f} | — |",
        f"| baseline: fraction > {cfg.threshold:g} if every head scored its mean | "
        f"{100 * float(sc['mean'] > cfg.threshold):.0f}% | — |",
        "", f"Top heads: {top}.", ""]
  base, per_k = _summary(payload.get("rows", []), cfg)
  lines += ["**Needle retrieval with heads masked** (test prompts; exact match / ROUGE-1 recall; random: mean of "
            f"{cfg.random_draws} draws outside the top {cfg.exclude_top})\n",
            "| k | none | top-k retrieval heads | k random heads | paper |", "|---:|---:|---:|---:|---|"]
  b = "—" if base is None else f"{base['exact']:.3f} / {base['rouge1']:.3f}"
  for k in cfg.ks:
    t, rs = per_k[k]["top"], per_k[k]["random"]
    tv = "—" if t is None else f"{t['exact']:.3f} / {t['rouge1']:.3f}"
    rv = "—" if not rs else f"{_mean(rs, 'exact'):.3f} / {_mean(rs, 'rouge1'):.3f}"
    lines.append(f"| {k} | {b} | {tv} | {rv} | top collapses, random ≈ none |")
  lines += ["", "Paper: " + "; ".join(PAPER.values()) + "."]
  return "\n".join(lines)


def verdict(payload: dict, cfg: RetrievalHeadsConfig) -> tuple[str, list[str]]:
  """The verdict line and notes: claim 1 sparsity (some head > threshold, at most :data:`SPARSE_MAX` of heads),
  claim 2 causality (top-k masking drops exact match by at least half of the baseline and at least twice as much
  as random-k, for at least half of the ks)."""
  from experiments.common.report import verdict_line
  notes = []
  sc = payload.get("scores")
  base, per_k = _summary(payload.get("rows", []), cfg)
  missing = sc is None or base is None or any(v["top"] is None or len(v["random"]) < cfg.random_draws
                                              for v in per_k.values())
  if missing:
    return verdict_line("not reproduced", "the run is incomplete; rerun with --resume"), notes
  sparse = sc["above"] >= 1 and sc["fraction"] <= SPARSE_MAX
  why1 = (f"{sc['above']} of {cfg.model.num_layers * cfg.model.num_heads} heads ({100 * sc['fraction']:.1f}%) score "
          f"> {cfg.threshold:g} (best {sc['max']:.2f}; paper < 5%)")
  if base["exact"] < MIN_BASE:
    return verdict_line("not reproduced", f"not testable: the unmasked model's needle exact match is "
                        f"{base['exact']:.2f} < {MIN_BASE}; {why1}"), notes
  hits = []
  for k in cfg.ks:
    dt = base["exact"] - per_k[k]["top"]["exact"]
    dr = base["exact"] - _mean(per_k[k]["random"], "exact")
    hits.append(dt >= 0.5 * base["exact"] and dt >= 2 * max(dr, 0.0))
    notes.append(f"k={k}: exact match drops by {dt:.3f} with the top-k heads masked, by {dr:.3f} with k random "
                 f"heads (baseline {base['exact']:.3f})")
  causal = sum(hits) * 2 >= len(hits)
  why2 = (f"masking the top-k heads collapses retrieval far more than random heads for {sum(hits)} of "
          f"{len(hits)} k (exact match {base['exact']:.2f} unmasked, {per_k[cfg.ks[0]]['top']['exact']:.2f} with "
          f"the top {cfg.ks[0]}, {_mean(per_k[cfg.ks[0]]['random'], 'exact'):.2f} with {cfg.ks[0]} random)")
  head = "reproduced" if sparse and causal else "partly" if sparse or causal else "not reproduced"
  return verdict_line(head, f"{why1}; {why2} (tiny {cfg.model.num_layers}-layer decoder, synthetic needles)"), notes


def _plots(payload, cfg, out: pathlib.Path) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  from experiments.common.plots import line_panels
  written = []
  sc = payload.get("scores")
  if sc is not None:
    s = np.asarray(sc["score"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].hist(s.ravel(), bins=np.linspace(0, 1, 21), color="tab:blue")
    axes[0].axvline(cfg.threshold, color="k", ls="--", label=f"threshold {cfg.threshold:g}")
    axes[0].set_xlabel("retrieval score")
    axes[0].set_ylabel("heads")
    axes[0].legend(fontsize="small")
    im = axes[1].imshow(s, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    axes[1].set_xlabel("head")
    axes[1].set_ylabel("layer")
    fig.colorbar(im, ax=axes[1])
    fig.suptitle(f"retrieval_heads ({cfg.name}): retrieval scores of {s.size} heads")
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=110)
    plt.close(fig)
    written.append("scores.png")
  base, per_k = _summary(payload.get("rows", []), cfg)
  if base is not None:
    panels = {}
    for metric in ("exact", "rouge1"):
      series = {"none": (list(cfg.ks), [base[metric]] * len(cfg.ks))}
      ks = [k for k in cfg.ks if per_k[k]["top"] is not None]
      series["top-k"] = (ks, [per_k[k]["top"][metric] for k in ks])
      ks = [k for k in cfg.ks if per_k[k]["random"]]
      series["random-k"] = (ks, [_mean(per_k[k]["random"], metric) for k in ks])
      panels["exact match" if metric == "exact" else "ROUGE-1 recall"] = series
    line_panels(panels, out / "masking.png", xlabel="heads masked k", ylabel="needle retrieval", log2_x=True,
                ylim=(-0.02, 1.02), title=f"retrieval_heads ({cfg.name}): masking top-k vs random-k heads")
    written.append("masking.png")
  att = payload.get("attention")
  if att is not None and (out / "attention.npz").exists():
    p = np.load(out / "attention.npz")["probs"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(np.sqrt(p), cmap="magma", aspect="auto")
    s0, s1 = att["needle"]
    for x in (s0 - 0.5, s1 - 0.5):
      ax.axvline(x, color="cyan", lw=0.6)
    ax.axhline(att["prompt_len"] - 1.5, color="white", lw=0.6)
    ax.set_xlabel("key position (cyan: needle span)")
    ax.set_ylabel("query position (below white: decode steps)")
    ax.set_title(f"top head L{att['head'][0]}H{att['head'][1]} (score {att['score']:.2f}), sqrt(attention)")
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=110)
    plt.close(fig)
    written.append("attention.png")
  return written


def _report(payload, cfg, out, verbose):
  from experiments.common.report import write_report
  md = table(payload, cfg)
  line, notes = verdict(payload, cfg)
  tr = payload.get("train", {})
  if tr:
    notes = [f"training: {tr.get('steps')} steps, final teacher-forced exact match {tr.get('final_exact', 0):.3f}, "
             f"{tr.get('cpu_seconds', '?')} CPU-seconds"] + notes
  if "cpu_seconds" in payload:
    notes.append(f"whole run: {payload['cpu_seconds']} CPU-seconds (process time), {payload.get('wall_seconds')} s "
                 f"wall")
  plots = _plots(payload, cfg, out)
  m = cfg.model
  title = (f"Retrieval heads at toy scale, preset {cfg.name} ({m.num_layers} layers x {m.num_heads} heads, "
           f"d_model {m.d_model}; {cfg.task.length}-token prompts, {cfg.task.needle_len}-token needles)")
  payload.update(table_markdown=md, notes=list(notes), verdict=line)
  write_report(out, payload, title=title, table=md, verdict=line, notes=notes, plots=plots, verbose=verbose)


def run(cfg: RetrievalHeadsConfig, out, *, resume: bool = False, report: bool = False, progress: bool = True,
        interrupt_after: int | None = None, verbose: bool = True, explicit_out: bool = True) -> dict:
  """Runs (or resumes, or only reports) the experiment; returns the ``results.json`` content.

  ``interrupt_after`` (tests): raise :class:`experiments.common.train.Interrupted` after that many training steps.
  """
  from experiments.common.report import environment, prepare_out_dir, write_json

  out = pathlib.Path(out)
  fp = config_lib.fingerprint(cfg)
  old = prepare_out_dir(out, fingerprint=fp, resume=resume, report=report, explicit_out=explicit_out)
  payload = dict(old) if old else dict(preset=cfg.name, fingerprint=fp, config=config_lib.to_dict(cfg), rows=[])
  if not report:
    import numpy as np
    from tqdm.auto import tqdm

    from experiments.common.metrics import MetricWriter
    from experiments.common.train import Trainer, fit
    from experiments.retrieval_heads import lm
    from jaxattn import analysis

    payload["environment"] = environment()
    t0, c0 = time.time(), time.process_time()
    t = cfg.task
    train_src, test_src, detect_src = (lm.NeedleSource(t, s) for s in ("train", "test", "detect"))
    trainer = Trainer(lambda rngs: lm.Decoder(cfg.model, t.vocab, rngs=rngs), lm.loss_fn(t.length),
                      lm.eval_fn(t.length), total_steps=cfg.train.steps, settings=cfg.train)
    writer = MetricWriter(out / "metrics.jsonl", run=cfg.name)
    res = fit(trainer, lr=cfg.train.lr, seed=cfg.train.seed, train_source=train_src, eval_source=test_src,
              batch_size=cfg.train.batch_size, eval_batch_size=min(64, t.test_size), eval_every=cfg.train.eval_every,
              checkpoint_dir=(out / "ckpt").resolve(), writer=writer, interrupt_after=interrupt_after,
              progress=progress, desc="retrieval_heads: training")
    if res.resumed_from is None or "train" not in payload:
      payload["train"] = dict(steps=res.steps, history=res.history, final_exact=res.final.get("exact", 0.0),
                              cpu_seconds=round(time.process_time() - c0, 1))
    write_json(out / "results.json", payload)
    model = trainer.model(res.state.params)
    K = t.needle_len
    if "scores" not in payload:
      det = detect_src.batch()
      gen, am = lm.generate(model, det.tokens, K, capture_argmax=True)
      rs = analysis.retrieval_scores(am, det.tokens, gen, det.needle_start, det.needle_end, answer=det.answer)
      ranked = analysis.rank_heads(rs.score)
      payload["scores"] = dict(score=np.round(rs.score, 5).tolist(), kept=int(rs.kept.sum()), prompts=len(det.tokens),
                               above=int((rs.score > cfg.threshold).sum()),
                               fraction=float(np.mean(rs.score > cfg.threshold)), max=float(rs.score.max()),
                               mean=float(rs.score.mean()), detect_exact=float(np.mean((gen == det.answer).all(1))),
                               top=[[list(h), float(rs.score[h])] for h in ranked[:8]])
      write_json(out / "results.json", payload)
    scores = np.asarray(payload["scores"]["score"])
    test = test_src.batch()
    done = {_key(r["method"], r["k"], r["draw"]) for r in payload["rows"]}
    todo = [c for c in plan(cfg) if _key(*c) not in done]
    if done and verbose:
      print(f"resumed: {len(done)} of {len(done) + len(todo)} masking cells already finished in {out}/", flush=True)
    bar = tqdm(total=len(todo), unit="run", disable=not progress or not todo, dynamic_ncols=True,
               bar_format="{desc} |{bar}| elapsed {elapsed}, ETA {remaining}")
    for i, (method, k, draw) in enumerate(todo):
      bar.set_description(f"retrieval_heads: run {i + 1} of {len(todo)} ({method} k={k})")
      heads = _heads_for(cfg, scores, method, k, draw)
      row = dict(method=method, k=k, draw=draw, heads=sorted([list(h) for h in heads]),
                 **_evaluate(model, test, K, heads, cfg.mask_mode))
      payload["rows"].append(row)
      write_json(out / "results.json", payload)
      bar.update(1)
    bar.close()
    if "attention" not in payload:
      (l, h), s = payload["scores"]["top"][0]
      gen, _ = lm.generate(model, test.tokens[:1], K)
      seq = np.concatenate([test.tokens[:1], gen], 1)
      probs = lm.attention_probs(model, seq, l)[0, h]  # [P + K, P + K]
      np.savez_compressed(out / "attention.npz", probs=probs.astype(np.float16))
      payload["attention"] = dict(head=[l, h], score=s, prompt_len=t.length,
                                  needle=[int(test.needle_start[0]), int(test.needle_end[0])],
                                  generated=gen[0].tolist(), answer=test.answer[0].tolist())
    payload["cpu_seconds"] = round(time.process_time() - c0 + (payload.get("cpu_seconds", 0) if resume else 0), 1)
    payload["wall_seconds"] = round(time.time() - t0, 1)
  _report(payload, cfg, out, verbose)
  return payload


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m experiments retrieval_heads``: see :func:`experiments.common.report.preset_main`."""
  return report_lib.preset_main("retrieval_heads", __doc__, PRESETS, run, argv)
