"""``python -m experiments halonet``: HaloNet-tiny vs a plain conv net vs global attention at equal parameters on
scikit-learn's digits, each 8 x 8 digit placed at a random offset on a 16 x 16 canvas (HaloNet, Vaswani et al.
2021, ``../shared/papers/efficient.md`` §7; presets in ``configs/halonet.py``).

Data: the 1797 bundled digits; train = the first 1257, test = the last 540 (split by index, never by chance);
offsets drawn per image from a fixed seed. Every (model, seed) is one :func:`experiments.common.train.fit` run
(Orbax checkpoints, so ``--resume`` continues a killed run; finished runs are kept in ``results.json``).
Reported per model: parameters, test accuracy (mean and spread over seeds), forward FLOPs per image (XLA's cost
analysis of the compiled forward) and the analytic attention FLOPs of the two mixers, beside the paper's claims.
Outputs (``--out``, default ``runs/halonet/<preset>/``): ``results.json``, ``table.md``, ``accuracy.png``,
``verdict.txt``, ``metrics.jsonl``; the last line printed is the verdict.
"""

from __future__ import annotations

import pathlib
import shutil
import time
from typing import Sequence

from configs.halonet import PRESETS, HaloNetConfig
from experiments.common import config as config_lib
from experiments.common import report as report_lib

__all__ = ["main", "run", "build_model", "plan", "verdict", "table", "attention_flops"]

NUM_TRAIN = 1257
PAPER = ("HaloNet: local self-attention backbones match or beat conv nets (ResNets) in accuracy at equal "
         "parameters (ImageNet: HaloNet-H7 84.9% top-1), and blocked local attention costs far less than global "
         "attention (FLOPs per query grow with the window (b+2h)^2, not the image)")
MIN_CONV = 0.5  # below this conv accuracy the runs are too short to compare anything
MATCH_MARGIN = 0.01  # "matches": halo accuracy >= conv accuracy - 1 point


def plan(cfg: HaloNetConfig) -> list[tuple[str, int]]:
  return [(m, s) for m in cfg.models for s in cfg.seeds]


# ------------------------------------------------------------------------------------------------------ data
def _digits_source(cfg: HaloNetConfig, train: bool):
  import numpy as np
  from sklearn.datasets import load_digits

  from experiments.common.data import GeneratedSource

  class DigitCanvas(GeneratedSource):
    PARAMS = ("canvas", "train", "seed")

    def __init__(self, canvas, train, seed):
      self.canvas, self.train, self.seed = canvas, train, seed

    def generate(self):
      d = load_digits()
      sl = slice(0, NUM_TRAIN) if self.train else slice(NUM_TRAIN, None)
      imgs, labels = d.images[sl].astype(np.float32) / 16.0, d.target[sl].astype(np.int32)
      rng = np.random.default_rng([self.seed, int(self.train)])
      off = rng.integers(0, self.canvas - 8 + 1, size=(len(imgs), 2))
      out = np.zeros((len(imgs), self.canvas, self.canvas, 1), np.float32)
      for n, (oy, ox) in enumerate(off):
        out[n, oy:oy + 8, ox:ox + 8, 0] = imgs[n]
      return {"image": out, "label": labels}

  return DigitCanvas(cfg.canvas, train, cfg.data_seed)


# ----------------------------------------------------------------------------------------------------- model
def build_model(cfg: HaloNetConfig, kind: str, rngs):
  """The classifier ``[B, canvas, canvas, 1] -> [B, 10]`` logits for ``kind`` in ``configs.halonet.MODELS``."""
  import jax.numpy as jnp
  from flax import nnx

  from jaxattn.nn import HaloAttention

  width = cfg.conv_width if kind == "conv" else cfg.attn_width

  def mixer(side):
    if kind == "conv":
      return nnx.Conv(width, width, (3, 3), padding="SAME", rngs=rngs)
    if kind == "global":
      return HaloAttention(width, cfg.heads, block=side, halo=0, rngs=rngs)
    return HaloAttention(width, cfg.heads, block=cfg.block, halo=0 if kind == "halo_h0" else cfg.halo, rngs=rngs)

  class Block(nnx.Module):
    def __init__(self, side):
      self.n1, self.n2 = nnx.LayerNorm(width, rngs=rngs), nnx.LayerNorm(width, rngs=rngs)
      self.mix = mixer(side)
      self.fc1, self.fc2 = nnx.Linear(width, 2 * width, rngs=rngs), nnx.Linear(2 * width, width, rngs=rngs)

    def __call__(self, x):
      x = x + self.mix(self.n1(x))
      return x + self.fc2(nnx.gelu(self.fc1(self.n2(x))))

  class Net(nnx.Module):
    def __init__(self):
      self.stem = nnx.Conv(1, width, (3, 3), padding="SAME", rngs=rngs)
      self.b1, self.b2 = Block(cfg.canvas), Block(cfg.canvas // 2)
      self.norm = nnx.LayerNorm(width, rngs=rngs)
      self.head = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x):
      x = self.b1(self.stem(x))
      B, Y, X, C = x.shape
      x = x.reshape(B, Y // 2, 2, X // 2, 2, C).mean(axis=(2, 4))
      x = self.b2(x)
      return self.head(self.norm(jnp.mean(x, axis=(1, 2))))

  return Net()


def _fns():
  import jax.numpy as jnp
  import optax

  def loss_fn(model, batch, key):
    del key
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

  def eval_fn(model, batch):
    logits = model(batch["image"])
    valid = batch["valid"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return {"loss": jnp.sum(loss * valid), "accuracy": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * valid),
            "count": jnp.sum(valid)}

  return loss_fn, eval_fn


def attention_flops(cfg: HaloNetConfig, kind: str) -> int:
  """Analytic FLOPs of the attention products (q.k and p.v, all heads, both stages) for one image; 0 for conv."""
  if kind == "conv":
    return 0
  total = 0
  for side in (cfg.canvas, cfg.canvas // 2):
    if kind == "global":
      keys = side * side
    else:
      keys = (cfg.block + 2 * (0 if kind == "halo_h0" else cfg.halo)) ** 2
    total += 2 * side * side * keys * 2 * cfg.attn_width
  return total


def _flops(cfg: HaloNetConfig, kind: str, params) -> dict:
  """XLA's FLOP count of one image's forward, and :func:`attention_flops`."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg, kind, nnx.Rngs(0))))
  fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
  ca = fwd.lower(params, jnp.zeros((1, cfg.canvas, cfg.canvas, 1))).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return {"xla_flops": float(ca.get("flops", float("nan"))), "attention_flops": attention_flops(cfg, kind)}


# ---------------------------------------------------------------------------------------------------- report
def _summary(rows, cfg):
  import numpy as np
  out = {}
  for m in cfg.models:
    rs = [r for r in rows if r["model"] == m]
    if rs:
      acc = np.array([r["accuracy"] for r in rs])
      out[m] = dict(n=len(rs), mean=float(acc.mean()), spread=float(acc.max() - acc.min()) / 2,
                    params=rs[0]["params"], xla_flops=rs[0]["xla_flops"], attention_flops=rs[0]["attention_flops"])
  return out


def table(rows, cfg: HaloNetConfig) -> str:
  s = _summary(rows, cfg)
  lines = ["| model | params | test accuracy (mean ± half-range, seeds) | forward MFLOPs / image (XLA) | "
           "attention MFLOPs / image | paper |",
           "|---|---:|---:|---:|---:|---|"]
  paper = {"conv": "ResNet baseline", "halo": f"HaloNet (b={cfg.block}, h={cfg.halo}): matches/beats conv",
           "halo_h0": "halo 0 ablation: h>0 expected >= h=0", "global": "global attention: more FLOPs"}
  for m in cfg.models:
    if m not in s:
      lines.append(f"| {m} | — | — | — | — | {paper[m]} |")
      continue
    r = s[m]
    lines.append(f"| {m} | {r['params']:,} | {r['mean']:.3f} ± {r['spread']:.3f} ({r['n']}) | "
                 f"{r['xla_flops'] / 1e6:.2f} | {r['attention_flops'] / 1e6:.2f} | {paper[m]} |")
  lines.append("")
  lines.append("Chance accuracy: 0.100 (10 classes). Paper (HaloNet, CVPR 2021): " + PAPER + ".")
  return "\n".join(lines)


def verdict(rows, cfg: HaloNetConfig) -> tuple[str, list[str]]:
  s = _summary(rows, cfg)
  notes = []
  if not {"conv", "halo"} <= set(s):
    return report_lib.verdict_line("not reproduced", "the sweep is incomplete (no finished conv or halo run); rerun "
                               "with --resume"), notes
  planned, finished = len(plan(cfg)), len(rows)
  partial = f"; partial sweep: {finished} of {planned} runs finished" if finished < planned else ""
  c, h = s["conv"], s["halo"]
  if c["mean"] < MIN_CONV:
    return report_lib.verdict_line("not reproduced", f"not testable: the conv baseline reaches only {c['mean']:.3f} "
                               f"(< {MIN_CONV}), too short a run to compare architectures{partial}"), notes
  match = h["mean"] >= c["mean"] - MATCH_MARGIN
  pr = h["params"] / c["params"]
  notes.append(f"params halo / conv = {pr:.3f}")
  why = [f"HaloNet-tiny {h['mean']:.3f} ({h['n']} seeds) vs conv {c['mean']:.3f} ({c['n']} seeds) at {pr:.2f}x "
         f"the parameters ({'matches' if match else 'does NOT match'} within {MATCH_MARGIN:.0%})"]
  g_flops = attention_flops(cfg, "global")
  cheap = h["attention_flops"] < g_flops
  g_acc = f", global accuracy {s['global']['mean']:.3f}" if "global" in s else ", global not trained"
  why.append(f"attention FLOPs {h['attention_flops'] / 1e6:.2f} M vs global {g_flops / 1e6:.2f} M per image "
             f"(analytic{g_acc})")
  if "halo_h0" in s:
    notes.append(f"halo ablation: h={cfg.halo} {h['mean']:.3f} vs h=0 {s['halo_h0']['mean']:.3f}")
  ok = [match, cheap]
  head = "reproduced" if all(ok) and not partial else "partly" if any(ok) else "not reproduced"
  return report_lib.verdict_line(head, "; ".join(why) + f" (toy scale: 16x16 digit canvases, {cfg.steps} steps"
                             f"{partial})"), notes


def _plot(rows, cfg, out: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  s = _summary(rows, cfg)
  fig, ax = plt.subplots(figsize=(6, 4))
  for m, r in s.items():
    ax.errorbar(r["attention_flops"] / 1e6 if m != "conv" else 0.0, r["mean"], yerr=r["spread"], fmt="o",
                capsize=4, label=f"{m} ({r['params']:,} params)")
  ax.set_xlabel("attention MFLOPs per image (conv: 0)")
  ax.set_ylabel("test accuracy")
  ax.set_title(f"halonet ({cfg.name}): digits on {cfg.canvas}x{cfg.canvas} canvases")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "accuracy.png", dpi=100)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------------- run
def run(cfg: HaloNetConfig, out, *, resume: bool = False, report: bool = False, progress: bool = True,
        verbose: bool = True, explicit_out: bool = True, interrupt_after: int | None = None) -> dict:
  """Runs (or resumes, or only reports) the sweep; returns the ``results.json`` content."""
  out = pathlib.Path(out)
  fp = config_lib.fingerprint(cfg)
  old = report_lib.prepare_out_dir(out, fingerprint=fp, resume=resume, report=report, explicit_out=explicit_out)
  rows = list(old["rows"]) if old else []
  payload = dict(preset=cfg.name, fingerprint=fp, config=config_lib.to_dict(cfg), environment=report_lib.environment(),
                 rows=rows, cpu_seconds=(old or {}).get("cpu_seconds", 0.0))
  if not report:
    import jax
    from tqdm.auto import tqdm

    from experiments.common.metrics import MetricWriter
    from experiments.common.train import Trainer, fit

    train_src, test_src = _digits_source(cfg, True), _digits_source(cfg, False)
    done = {(r["model"], r["seed"]) for r in rows}
    todo = [c for c in plan(cfg) if c not in done]
    if done and verbose:
      print(f"resumed: {len(done)} of {len(done) + len(todo)} runs already finished in {out}/", flush=True)
    loss_fn, eval_fn = _fns()
    bar = tqdm(total=len(todo), unit="run", disable=not progress or not todo, dynamic_ncols=True,
               bar_format="{desc} |{bar}| elapsed {elapsed}, ETA {remaining}")
    trainers = {}
    for k, (m, seed) in enumerate(todo):
      bar.set_description(f"halonet: run {k + 1} of {len(todo)} ({m}, seed {seed})")
      c0, t0 = time.process_time(), time.time()
      if m not in trainers:
        trainers = {m: Trainer(lambda rngs, m=m: build_model(cfg, m, rngs), loss_fn, eval_fn,
                               total_steps=cfg.steps, settings=cfg)}
      trainer = trainers[m]
      writer = MetricWriter(out / "metrics.jsonl", run=f"{m}-s{seed}")
      ckpt = out / "ckpt" / f"{m}-s{seed}"
      res = fit(trainer, lr=cfg.lr, seed=seed, train_source=train_src, eval_source=test_src,
                batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, eval_every=cfg.steps,
                checkpoint_dir=ckpt, checkpoint_every=max(cfg.steps // 4, 1), writer=writer, log_every=0,
                interrupt_after=interrupt_after, progress=progress, desc=f"{m}-s{seed}")
      writer.close()
      params = res.state.params
      row = dict(model=m, seed=seed, accuracy=res.final["accuracy"], test_loss=res.final["loss"],
                 params=int(sum(x.size for x in jax.tree.leaves(params))), steps=res.steps,
                 **_flops(cfg, m, params), wall_s=round(time.time() - t0, 1),
                 cpu_s=round(time.process_time() - c0, 1))
      rows.append(row)
      payload["cpu_seconds"] = round(payload["cpu_seconds"] + row["cpu_s"], 1)
      report_lib.write_json(out / "results.json", payload)
      shutil.rmtree(ckpt, ignore_errors=True)
      bar.update(1)
    bar.close()
    if (out / "ckpt").exists() and not any((out / "ckpt").iterdir()):
      (out / "ckpt").rmdir()
  md = table(rows, cfg)
  line, notes = verdict(rows, cfg)
  notes = notes + [f"CPU seconds (process time, all runs): {payload['cpu_seconds']}"]
  _plot(rows, cfg, out)
  report_lib.write_report(out, payload, title=f"HaloNet at toy scale, preset {cfg.name}", table=md, verdict=line,
                      notes=notes, plots=["accuracy.png"], verbose=verbose)
  payload.update(table_markdown=md, notes=notes, verdict=line)
  return payload


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m experiments halonet``: see :func:`experiments.common.report_lib.preset_main`."""
  return report_lib.preset_main("halonet", __doc__, PRESETS, run, argv)
