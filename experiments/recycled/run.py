"""``python -m experiments recycled``: Recycled Attention / RefreshKV (Xu, Goyal, Choi, arXiv 2411.05787;
``../shared/papers/efficient.md`` §2) on the tiny long-context LM of :mod:`experiments.longctx`.

Each cell (policy, N) prefills ``N - decode_len`` tokens densely, then decodes the last ``decode_len`` tokens one
at a time, teacher forced, every layer attending the keys its cache policy keeps (K = N/8 per kv head):

- ``vanilla``: every key (dense);
- ``streaming``: StreamingLLM, ``sinks`` first keys + the ``K - sinks`` most recent;
- ``h2o``: H2O, the prompt compressed to K/2 heavy hitters (attention accumulated over every prompt query,
  :func:`jaxattn.cache.h2o_select`) + K/2 recent, then one eviction per step (the lowest accumulated score outside
  the K/2 most recent; scores grow by the attention each step actually computes);
- ``snapkv``: SnapKV with an observation window of 1 and pooling 7 (the paper's baseline setting): the top-K of
  the last prompt token's pooled probabilities (:func:`jaxattn.cache.select_topk_from_probs`), plus every decoded
  token, never refreshed;
- ``recycled_s<S>`` / ``recycled_qs``: :func:`jaxattn.cache.recycled_init` and
  :func:`jaxattn.cache.recycled_decode_step` (fixed stride S / the query-similarity schedule), one state per
  sequence (``jax.vmap`` over the batch, so each sequence has its own schedule, as at batch size 1 in the paper).

Per cell: the mean next-token NLL of the decoded tokens (all of them, and the answer tokens alone), answer-token
accuracy, the attention-mass recovery (the fraction of the dense softmax mass of each step's query — on the
policy's own activations — that the attended keys hold, averaged over steps, layers and heads), the fraction of
full-attention steps and the keys attended per step relative to dense (the modelled attention FLOPs and K/V bytes
of a decode step are proportional to it; measured time is ``python -m experiments decode_bench``).

The ``vanilla`` cell also yields the recovery curve: for every step t0 and s = 0..``recovery_steps``, the dense
mass of step t0 + s that the recycled set chosen at t0 (top-K of t0's pooled, group-max probabilities) covers,
beside a sink + window set of the same size K at step t0 + s.

Outputs (``--out``, default ``runs/recycled/<preset>/``): ``results.json``, ``table.md``, ``recovery.png``,
``loss.png``, ``verdict.txt``; finished cells are kept: ``--resume`` continues, ``--report`` rebuilds.
"""

from __future__ import annotations

import functools
import pathlib
import time
from typing import Sequence

import jax
import jax.numpy as jnp

from configs.recycled import PRESETS, RecycledConfig, stride_of
from experiments.common import config as config_lib
from experiments.common import report as report_lib

__all__ = ["main", "run", "plan", "verdict", "table", "recovery_curve"]

MIN_DENSE = 0.3  # dense answer accuracy below this: task accuracy is "not testable"
# Table 1 of the paper (Llama-3.1-8B, 16K context, K = 2048, PPL of the last 256 tokens, Arxiv / Book).
PAPER_PPL = {"vanilla": "2.22 / 7.07", "streaming": "2.62 / 7.94", "h2o": "2.48 / 7.60", "snapkv": "2.54 / 7.78",
             "recycled_s5": "2.27 / 7.31 (QC=5)", "recycled_s10": "2.32 / 7.41 (QC=10)",
             "recycled_qs": "2.27 / 7.31 (QC=5)"}
PAPER_ORDER = "vanilla < recycled < SnapKV ~ StreamingLLM in loss (Table 1)"


def plan(cfg: RecycledConfig) -> list[tuple[str, int]]:
  """Every cell ``(policy, N)``."""
  return [(p, n) for n in cfg.lengths for p in cfg.policies]


def _key(policy: str, n: int) -> str:
  return f"{policy}/N{n}"


# ------------------------------------------------------------------------------------------------------ decoding
def _unbatch_state(st):
  """A batch-1 :class:`RecycledKVCache` without its batch axis (``since_full`` is already a scalar)."""
  from jaxattn.cache import RecycledKVCache
  return RecycledKVCache(full=jax.tree.map(lambda a: a[0], st.full), partial=jax.tree.map(lambda a: a[0], st.partial),
                         score=st.score[0], q_mean=st.q_mean[0], since_full=st.since_full)


def _batch_state(st):
  """The inverse of :func:`_unbatch_state`: a batch axis of 1 on every array but ``since_full``."""
  from jaxattn.cache import RecycledKVCache
  return RecycledKVCache(full=jax.tree.map(lambda a: a[None], st.full),
                         partial=jax.tree.map(lambda a: a[None], st.partial), score=st.score[None],
                         q_mean=st.q_mean[None], since_full=st.since_full)


def _set_mask(index, valid, L):
  """``(index, valid) [B, G, K]`` -> ``[B, G, L]`` bool."""
  B, G, _ = index.shape
  b, g = jnp.arange(B)[:, None, None], jnp.arange(G)[None, :, None]
  return jnp.zeros((B, G, L), bool).at[b, g, jnp.clip(index, 0, L - 1)].max(valid)


@functools.lru_cache(maxsize=None)
def _decoder(policy: str, K: int, P: int, cfg: RecycledConfig):
  """The jitted teacher-forced decode of ``tokens [B, T]`` (prefill ``P`` tokens) under ``policy``."""
  from flax import nnx

  from jaxattn import cache as kv
  from jaxattn import masks
  from jaxattn.ops.softmax import softmax_attention

  stride = stride_of(policy)
  recycled = policy.startswith("recycled")
  sched = dict(schedule="fixed", stride=stride) if stride else \
      dict(schedule="query_similarity", qc_stride=cfg.qc_stride, threshold=cfg.threshold)

  @nnx.jit
  def decode(model, tokens):
    B, T = tokens.shape
    A = T - P  # decode steps: tokens P .. T-1, step t predicts token P + t + 1 (the last prediction is unused)
    room = (stride if stride else A) + 1
    x = model.embed(tokens[:, :P])
    states = []
    for block in model.blocks:
      q, k, v = block.qkv(x, jnp.arange(P))
      G, D = k.shape[2], k.shape[3]
      c = kv.prefill(kv.init(B, T, G, D, dtype=k.dtype), k, v)
      x = block.finish(x, softmax_attention(q, k, v, mask=masks.Causal()))
      if recycled:
        def init1(c1, q1):  # one sequence (no batch axis): its own state, so its own schedule
          _, s1 = kv.recycled_init(jax.tree.map(lambda a: a[None], c1), q1[None], k=K, room=room, pool=cfg.pool)
          return _unbatch_state(s1)
        states.append(jax.vmap(init1)(c, q[:, -1:]))
      elif policy == "snapkv":
        _, probs = kv.decode_with_probs(q[:, -1:], c)
        idx, ok, _ = kv.select_topk_from_probs(probs[:, 0], K, num_kv_heads=G, pool=cfg.pool, lengths=c.lengths)
        states.append((c, _set_mask(idx, ok, T)))
      elif policy == "h2o":
        H = q.shape[2]
        s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32),
                       jnp.repeat(k, H // G, axis=2).astype(jnp.float32)) / jnp.sqrt(D)
        s = jnp.where(jnp.tril(jnp.ones((P, P), bool)), s, -jnp.inf)
        col = jax.nn.softmax(s, -1).sum(2).reshape(B, G, H // G, P).sum(2)  # accumulated attention [B, G, P]
        score = jnp.pad(col, [(0, 0), (0, 0), (0, T - P)])
        idx, ok = kv.h2o_select(c, score, budget=K)
        states.append((c, _set_mask(idx, ok, T), score))
      else:
        states.append((c,))
    # the prefill's last logits predict tokens[:, P] densely for every policy: not scored

    def step(states, t):
      tok = jax.lax.dynamic_index_in_dim(tokens, P + t, axis=1, keepdims=True)
      x = model.embed(tok)
      new, recs, kept, fulls = [], [], [], []
      for block, st in zip(model.blocks, states):
        q, k, v = block.qkv(x, (P + t)[None])
        if recycled:
          def step1(s1, q1, k1, v1):  # one sequence; lax.cond under vmap runs both branches and selects
            o1, s2, f1 = kv.recycled_decode_step(_batch_state(s1), q1[None], k1[None], v1[None], k=K, pool=cfg.pool,
                                                 **sched)
            return o1[0], _unbatch_state(s2), f1
          o, st1, full = jax.vmap(step1)(st, q, k[:, 0], v[:, 0])  # every state field has a batch axis
          c = st1.full
          _, probs = kv.decode_with_probs(q, c)
          L = c.capacity
          pos = st1.partial.positions  # [B, C, G]
          ok = st1.partial.valid & (pos >= 0)
          mask = _set_mask(jnp.swapaxes(pos, 1, 2), jnp.swapaxes(ok, 1, 2), L)
          mask = mask | full[:, None, None]
          new.append(st1)
          fulls.append(full.astype(jnp.float32))
        else:
          c = kv.append(st[0], k, v)
          _, probs = kv.decode_with_probs(q, c)
          L = c.capacity
          slot = jnp.arange(L)[None, None, :]
          n = c.lengths[:, None, None]
          if policy == "vanilla":
            mask = jnp.broadcast_to(slot < n, (B, c.shape[2], L))
            o = kv.decode_with_probs(q, c)[0]
            new.append((c,))
          elif policy == "streaming":
            mask = ((slot < cfg.sinks) | (slot >= n - (K - cfg.sinks))) & (slot < n)
            mask = jnp.broadcast_to(mask, (B, c.shape[2], L))
            o = kv.decode_with_probs(q, c, key_mask=mask)[0]
            new.append((c,))
          elif policy == "snapkv":
            mask = st[1] | (slot == n - 1)  # the new token joins the set
            o = kv.decode_with_probs(q, c, key_mask=mask)[0]
            new.append((c, mask))
          else:  # h2o: the new token joins, attention accumulates, then one eviction keeps K keys
            alive = st[1] | (slot == n - 1)
            o, pm = kv.decode_with_probs(q, c, key_mask=alive)
            G = c.shape[2]
            score = st[2] + pm[:, 0].reshape(B, G, -1, L).sum(2)
            old = alive & (slot < n - (K - K // 2))
            over = jnp.sum(alive, -1, keepdims=True) > K  # [B, G, 1]
            victim = jnp.argmin(jnp.where(old, score, jnp.inf), -1)[..., None]  # [B, G, 1]
            alive = alive & ~(over & (slot == victim))
            mask = st[1] | (slot == n - 1)
            new.append((c, alive, score))
          fulls.append(jnp.full((B,), policy == "vanilla", jnp.float32))
        H, G = q.shape[2], mask.shape[1]
        mh = jnp.repeat(mask, H // G, axis=1)  # [B, H, L]
        recs.append(jnp.sum(jnp.where(mh, probs[:, 0], 0.0), -1).mean(-1))  # [B]
        kept.append(jnp.sum(mask, -1).mean(-1) / c.lengths)  # [B] fraction of the seen keys attended
        x = block.finish(x, o)
      logits = model.logits(x[:, 0])
      return new, (logits, jnp.stack(recs, 1), jnp.stack(kept, 1), jnp.stack(fulls, 1))

    _, (logits, rec, kept, full) = jax.lax.scan(step, states, jnp.arange(A))
    logp = jax.nn.log_softmax(logits[:-1], -1)  # [A-1, B, V]: predicts tokens P+1 .. T-1
    tgt = jnp.transpose(tokens[:, P + 1:])  # [A-1, B]
    nll = -jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    pred = jnp.argmax(logits[:-1], -1)
    return nll.T, (pred == tgt).T, rec, kept, full  # nll/right [B, A-1]; rec/kept/full [A, B, layers]

  return decode


@functools.lru_cache(maxsize=None)
def _dense_probs(K: int, P: int, pool: int):
  """The jitted dense decode that returns every step's probabilities ``[A, layers, B, H, T]`` and the recycled
  top-K selection of each step ``[A, layers, B, G, K]`` (recovery curve)."""
  from flax import nnx

  from jaxattn import cache as kv
  from jaxattn import masks
  from jaxattn.ops.softmax import softmax_attention

  @nnx.jit
  def decode(model, tokens):
    B, T = tokens.shape
    x = model.embed(tokens[:, :P])
    caches = []
    for block in model.blocks:
      q, k, v = block.qkv(x, jnp.arange(P))
      caches.append(kv.prefill(kv.init(B, T, k.shape[2], k.shape[3], dtype=k.dtype), k, v))
      x = block.finish(x, softmax_attention(q, k, v, mask=masks.Causal()))

    def step(caches, t):
      tok = jax.lax.dynamic_index_in_dim(tokens, P + t, axis=1, keepdims=True)
      x = model.embed(tok)
      new, ps, sel = [], [], []
      for block, c in zip(model.blocks, caches):
        q, k, v = block.qkv(x, (P + t)[None])
        c = kv.append(c, k, v)
        o, probs = kv.decode_with_probs(q, c)
        idx, _, _ = kv.select_topk_from_probs(probs[:, 0], K, num_kv_heads=c.shape[2], pool=pool, lengths=c.lengths)
        new.append(c)
        ps.append(probs[:, 0])
        sel.append(idx)
        x = block.finish(x, o)
      return new, (jnp.stack(ps), jnp.stack(sel))

    _, (probs, sel) = jax.lax.scan(step, caches, jnp.arange(T - P))
    return probs, sel

  return decode


def recovery_curve(probs, sel, *, prompt_len: int, k: int, sinks: int, steps: int) -> dict:
  """Mean recovered mass at s = 0..``steps`` after an anchor step (numpy).

  Args:
    probs: ``[A, layers, B, H, T]`` dense probabilities of decode steps 0..A-1 (step t's query sits at position
      ``prompt_len + t`` and sees ``prompt_len + t + 1`` keys).
    sel: ``[A, layers, B, G, k]`` the top-k set chosen from each step's probabilities.

  Returns:
    ``{"recycled": [steps + 1], "sink_window": [steps + 1], "dense": [steps + 1], "recycled_per_layer":
    [layers][steps + 1]}``: the set chosen at t0 scored on step t0 + s's probabilities, averaged over every t0 with
    t0 + steps < A, batch and heads; sink + window has the same size k at step t0 + s; dense is the whole row
    (1 up to rounding).
  """
  import numpy as np
  probs = np.asarray(probs, np.float64)
  sel = np.asarray(sel)
  A, nl, B, H, T = probs.shape
  G = sel.shape[3]
  anchors = range(A - steps)
  rec, sw, dense = np.zeros((steps + 1, nl)), np.zeros(steps + 1), np.zeros(steps + 1)
  for s in range(steps + 1):
    for t0 in anchors:
      p = probs[t0 + s]  # [nl, B, H, T]
      m = np.zeros((nl, B, G, T), bool)
      np.put_along_axis(m, sel[t0], True, axis=-1)
      mh = np.repeat(m, H // G, axis=2)
      rec[s] += (p * mh).sum(-1).mean((1, 2))
      n = prompt_len + t0 + s + 1
      win = np.zeros(T, bool)
      win[:sinks] = True
      win[n - (k - sinks):n] = True
      sw[s] += (p * win).sum(-1).mean()
      dense[s] += p.sum(-1).mean()
  na = len(anchors)
  return {"recycled": (rec.mean(1) / na).tolist(), "sink_window": (sw / na).tolist(),
          "dense": (dense / na).tolist(), "recycled_per_layer": (rec.T / na).tolist()}


# ------------------------------------------------------------------------------------------------------ cells
def _data(cfg: RecycledConfig, model_cfg, n: int):
  """``(tokens [B, n], answer [B, n])``: ``samples_per_task`` sequences per task, tasks in order."""
  import numpy as np

  from experiments.longctx.tasks import LongCtxSource
  toks, ans = [], []
  for t in model_cfg.data.tasks:
    src = LongCtxSource(n, cfg.samples_per_task, cfg.seed, model_cfg.data, tasks=(t,))
    toks.append(np.asarray(src.arrays["tokens"]))
    ans.append(np.asarray(src.arrays["answer"]))
  return np.concatenate(toks), np.concatenate(ans)


def _eval_cell(model, cfg: RecycledConfig, policy: str, n: int, tokens, answer) -> dict:
  import numpy as np
  K, P = cfg.budget(n), n - cfg.decode_len
  nll, right, rec, kept, full = _decoder(policy, K, P, cfg)(model, jnp.asarray(tokens))
  nll, right = np.asarray(nll, np.float64), np.asarray(right)
  a = np.asarray(answer)[:, P + 1:]
  rec, kept, full = (np.asarray(x, np.float64) for x in (rec, kept, full))
  return dict(K=K, prompt_len=P, nll=float(nll.mean()), nll_answer=float(nll[a].mean()) if a.any() else None,
              accuracy=float(right[a].mean()) if a.any() else None, answers=int(a.sum()),
              recovery=float(rec.mean()), recovery_per_layer=[round(float(x), 4) for x in rec.mean((0, 1))],
              full_fraction=float(full.mean()), keys_relative=float(kept.mean()))


# ------------------------------------------------------------------------------------------------------ report
def _cells(rows):
  return {(r["policy"], r["N"]): r for r in rows if "policy" in r}


def _fmt(x, f="{:.3f}"):
  return "—" if x is None else f.format(x)


def table(rows: list[dict], curves: dict, cfg: RecycledConfig) -> str:
  """Markdown: the quality / cost table per N and the recovery curve."""
  cells = _cells(rows)
  lines = []
  for n in cfg.lengths:
    d = cells.get(("vanilla", n))
    lines.append(f"**N = {n}, K = N/{cfg.budget_div} = {cfg.budget(n)}, last {cfg.decode_len} tokens decoded**\n")
    lines.append("| policy | NLL (all decoded) | NLL (answers) | answer acc. | attention-mass recovery | full steps | "
                 "keys / step vs dense | paper PPL (Llama-3.1-8B Arxiv / Book) |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---|")
    for p in cfg.policies:
      r = cells.get((p, n))
      if r is None:
        lines.append(f"| {p} | — | — | — | — | — | — | {PAPER_PPL.get(p, '')} |")
        continue
      dn = "" if d is None or p == "vanilla" else f" ({r['nll'] - d['nll']:+.3f})"
      lines.append(f"| {p} | {r['nll']:.3f}{dn} | {_fmt(r['nll_answer'])} | {_fmt(r['accuracy'])} | "
                   f"{r['recovery']:.3f} | {r['full_fraction']:.2f} | {r['keys_relative']:.3f} | "
                   f"{PAPER_PPL.get(p, '')} |")
    lines.append("")
  for n in cfg.lengths:
    c = curves.get(str(n))
    if not c:
      continue
    S = len(c["recycled"]) - 1
    lines.append(f"**Attention-mass recovery, N = {n}, K = {cfg.budget(n)}**: dense mass of step t0 + s covered by "
                 f"the top-K set of step t0 (recycled) vs sink + window of equal size K\n")
    lines.append("| set | " + " | ".join(f"s={s}" for s in range(S + 1)) + " |")
    lines.append("|---|" + "---:|" * (S + 1))
    for name in ("recycled", "sink_window", "dense"):
      lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in c[name]) + " |")
    lines.append("")
  lines.append(f"Paper: {PAPER_ORDER}; recovered attention mass of a recent token's top-K far above StreamingLLM's "
               f"(§2 preliminary study). Decode cost model: T*L/S + T*K vs T*L (Table 7).")
  return "\n".join(lines)


def verdict(rows: list[dict], curves: dict, cfg: RecycledConfig) -> tuple[str, list[str]]:
  cells = _cells(rows)
  notes = []
  rec_names = [p for p in cfg.policies if p.startswith("recycled")]
  base_names = [p for p in ("snapkv", "streaming") if p in cfg.policies]
  if any(("vanilla", n) not in cells for n in cfg.lengths) or any(str(n) not in curves for n in cfg.lengths):
    return report_lib.verdict_line("not reproduced", "the sweep is incomplete; rerun with --resume"), notes
  order_ok, rec_ok = [], []
  for n in cfg.lengths:
    d = cells[("vanilla", n)]
    if d["accuracy"] is not None and d["accuracy"] < MIN_DENSE:
      notes.append(f"N={n}: task accuracy not testable (dense answer accuracy {d['accuracy']:.3f} < {MIN_DENSE})")
    recs = [cells[(p, n)] for p in rec_names if (p, n) in cells]
    bases = [cells[(p, n)] for p in base_names if (p, n) in cells]
    if recs and bases:
      worst_rec = max(r["nll"] for r in recs)
      best_base = min(b["nll"] for b in bases)
      ok = d["nll"] <= min(r["nll"] for r in recs) + 1e-9 and worst_rec < best_base
      order_ok.append(ok)
      notes.append(f"N={n}: NLL vanilla {d['nll']:.3f}, recycled {min(r['nll'] for r in recs):.3f}-{worst_rec:.3f}, "
                   f"SnapKV/StreamingLLM {best_base:.3f}-{max(b['nll'] for b in bases):.3f} -> ordering "
                   f"{'holds' if ok else 'does NOT hold'}")
    c = curves[str(n)]
    S = min(len(c["recycled"]) - 1, max(stride_of(p) or 0 for p in cfg.policies) or len(c["recycled"]) - 1)
    ok = all(r > w for r, w in zip(c["recycled"][1:S + 1], c["sink_window"][1:S + 1]))
    rec_ok.append(ok)
    notes.append(f"N={n}: recovery s=1 recycled {c['recycled'][1]:.3f} vs sink+window {c['sink_window'][1]:.3f}; "
                 f"s={S} {c['recycled'][S]:.3f} vs {c['sink_window'][S]:.3f}")
    for p in rec_names:
      r = cells.get((p, n))
      if r is not None:
        st = stride_of(p)
        model = f", model 1/S + K/L = {1 / st + cfg.budget(n) / n:.3f}" if st else ""
        notes.append(f"N={n} {p}: full steps {r['full_fraction']:.2f}, keys per step {r['keys_relative']:.3f} of "
                     f"dense{model}")
  c1, c2 = all(order_ok) and bool(order_ok), all(rec_ok)
  why = (f"the ordering {PAPER_ORDER.split(' (')[0]} {'holds' if c1 else 'does not hold'} at "
         f"{sum(order_ok)} of {len(order_ok)} lengths; the recycled top-K set recovers "
         f"{'more' if c2 else 'NOT always more'} attention mass than sink + window of equal size for s = 1..S "
         f"(tiny 4-layer model, synthetic tasks, NLL and mass as primary metrics)")
  head = "reproduced" if c1 and c2 else ("partly" if c1 or c2 else "not reproduced")
  return report_lib.verdict_line(head, why), notes


def _plots(rows, curves, cfg, out: pathlib.Path) -> list[str]:
  from experiments.common.plots import line_panels
  panels = {}
  for n in cfg.lengths:
    c = curves.get(str(n))
    if c:
      xs = list(range(len(c["recycled"])))
      panels[f"N={n}, K={cfg.budget(n)}"] = {"recycled top-K (from step t0)": (xs, c["recycled"]),
                                             "sink + window (size K)": (xs, c["sink_window"])}
  line_panels(panels, out / "recovery.png", xlabel="steps s since the full-attention step",
              ylabel="dense attention mass recovered", ylim=(0.0, 1.02),
              title=f"recycled ({cfg.name}): attention-mass recovery")
  cells = _cells(rows)
  series = {}
  for p in cfg.policies:
    pts = [(n, cells[(p, n)]["nll"]) for n in cfg.lengths if (p, n) in cells]
    if pts:
      series[p] = ([a for a, _ in pts], [b for _, b in pts])
  line_panels({"mean NLL of the decoded tokens": series}, out / "loss.png", xlabel="N", ylabel="NLL (nats)",
              log2_x=True, title=f"recycled ({cfg.name}): decode loss by policy, K = N/{cfg.budget_div}")
  return ["recovery.png", "loss.png"]


# ------------------------------------------------------------------------------------------------------ driver
def run(cfg: RecycledConfig, out: str | pathlib.Path, *, resume: bool = False, report: bool = False,
        progress: bool = True, model_root: str | pathlib.Path | None = None, verbose: bool = True,
        explicit_out: bool = True) -> dict:
  """Runs (or resumes, or only reports) the sweep; returns the ``results.json`` content."""
  from configs.longctx import get_config

  out = pathlib.Path(out)
  model_cfg = get_config(cfg.model)
  fp = config_lib.fingerprint({"sweep": cfg, "model": model_cfg})
  old = report_lib.prepare_out_dir(out, fingerprint=fp, resume=resume, report=report, explicit_out=explicit_out)
  rows = list(old["rows"]) if old else []
  curves = dict(old.get("recovery", {})) if old else {}
  payload = dict(preset=cfg.name, fingerprint=fp, config=config_lib.to_dict(cfg),
                 model_config=config_lib.to_dict(model_cfg), rows=rows, recovery=curves,
                 train=old.get("train", {}) if old else {}, cpu_seconds=old.get("cpu_seconds", 0.0) if old else 0.0,
                 wall_seconds=old.get("wall_seconds", 0.0) if old else 0.0)
  if not report:
    payload["environment"] = report_lib.environment()
    for n in cfg.lengths:
      if n > model_cfg.train.train_len:
        raise config_lib.ConfigError(f"length {n} exceeds the model's training length {model_cfg.train.train_len} "
                                     f"(RoPE does not extrapolate)")
      if cfg.decode_len <= model_cfg.data.query_len:
        raise config_lib.ConfigError(f"decode_len {cfg.decode_len} must exceed the query segment "
                                     f"({model_cfg.data.query_len} tokens)")
    from tqdm.auto import tqdm

    from experiments.longctx.train import load_or_train
    t0, c0 = time.time(), time.process_time()
    trained = load_or_train(model_cfg, root=model_root, progress=progress)
    if not payload["train"] or not trained.cached:
      payload["train"] = dict(directory=str(trained.directory), cached=trained.cached,
                              seconds=round(trained.train_seconds, 1))
    done = {_key(r["policy"], r["N"]) for r in rows}
    todo = [c for c in plan(cfg) if _key(*c) not in done] + \
        [("recovery", n) for n in cfg.lengths if str(n) not in curves]
    if done and verbose:
      print(f"resumed: {len(done)} cells already finished in {out}/", flush=True)
    bar = tqdm(total=len(todo), unit="cell", disable=not progress or not todo, dynamic_ncols=True,
               bar_format="{desc} |{bar}| elapsed {elapsed}, ETA {remaining}")
    data = {}
    for i, (policy, n) in enumerate(todo):
      bar.set_description(f"recycled: run {i + 1} of {len(todo)} ({policy} N={n})")
      if n not in data:
        data = {n: _data(cfg, model_cfg, n)}
      toks, ans = data[n]
      t1 = time.time()
      if policy == "recovery":
        K, P = cfg.budget(n), n - cfg.decode_len
        probs, sel = _dense_probs(K, P, cfg.pool)(trained.model, jnp.asarray(toks))
        curves[str(n)] = recovery_curve(probs, sel, prompt_len=P, k=K, sinks=cfg.sinks, steps=cfg.recovery_steps)
      else:
        rows.append(dict(policy=policy, N=n, **_eval_cell(trained.model, cfg, policy, n, toks, ans),
                         seconds=round(time.time() - t1, 1)))
      payload["cpu_seconds"] = round(payload["cpu_seconds"] + time.process_time() - c0, 1)
      payload["wall_seconds"] = round(payload["wall_seconds"] + time.time() - t0, 1)
      t0, c0 = time.time(), time.process_time()
      report_lib.write_json(out / "results.json", payload)
      bar.update(1)
    bar.close()
  md = table(rows, curves, cfg)
  line, notes = verdict(rows, curves, cfg)
  plots = _plots(rows, curves, cfg, out)
  tr = payload.get("train", {})
  title = (f"Recycled Attention at toy scale, preset {cfg.name}\n\nModel: longctx preset `{cfg.model}` "
           f"({model_cfg.model.num_layers} layers, d={model_cfg.model.d_model}, trained at "
           f"{model_cfg.train.train_len} tokens; {tr.get('directory', '?')}). {cfg.samples_per_task} sequences per "
           f"task x {len(model_cfg.data.tasks)} tasks per cell; {payload['cpu_seconds']} CPU-seconds "
           f"({payload['wall_seconds']} s wall) of evaluation. Attention cost relative to dense = the keys column "
           f"(FLOPs and K/V bytes per step scale with it); measured decode time: `python -m experiments "
           f"decode_bench`")
  report_lib.write_report(out, payload, title=title, table=md, verdict=line, notes=notes, plots=plots,
                          verbose=verbose)
  return {**payload, "table_markdown": md, "notes": notes, "verdict": line}


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m experiments recycled``: see :func:`experiments.common.report.preset_main`."""
  return report_lib.preset_main("recycled", __doc__, PRESETS, run, argv, model_root=True)
