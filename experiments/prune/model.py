"""The toy VLM of the pruning experiment and its pruned forward passes.

:class:`PruneVLM` = a local stem (each patch token is an MLP of its 3 x 3 patch neighbourhood) -> a ViT with a
[CLS] token (``vit_layers`` full-attention :class:`~experiments.substrates.vit.Block`
s; an auxiliary head classifies the real digit from [CLS]) -> a linear projector of the ViT's hidden state at
``feature_layer`` (0: patch embeddings, local features) -> a causal LM (``lm_layers`` causal ``Block`` s) over
``[visual; text]`` with learned positions; the answer is read at the last prompt token.

Pruning (``jaxattn.prune``): visual tokens are removed before LM block ``l`` for each stage ``(l, idx)`` of a plan
(``l = 0``: before the LM, FasterVLM's place). :func:`lm_forward` gathers the kept tokens (the inference path);
``executor="mask"`` instead keeps the full sequence and gives pruned tokens their own segment id (same outputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.prune import ModelConfig, TaskConfig
from experiments.prune.data import PROMPT, WORDS
from experiments.substrates.vit import Block, patchify
from jaxattn import masks, prune

__all__ = ["PruneVLM", "vit_forward", "lm_forward", "layer_qk", "answer_logits"]


class PruneVLM(nnx.Module):
  """``(images [B, S, S], tokens [B, P], length [B]) -> (answer logits [B, V], [CLS] logits [B, 10])``."""

  def __init__(self, m: ModelConfig, task: TaskConfig, *, rngs: nnx.Rngs):
    self.patch, self.feature_layer = task.patch, m.feature_layer
    n = task.num_tokens
    self.num_tokens = n
    self.cls = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, m.vit_dim)))
    # local stem: each patch token sees its 3 x 3 patch neighbourhood (an 8 x 8 digit fits in it) and nothing else
    self.embed = nnx.Linear(9 * task.patch * task.patch, m.vit_dim, rngs=rngs)
    self.embed2 = nnx.Linear(m.vit_dim, m.vit_dim, rngs=rngs)
    self.vpos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (n + 1, m.vit_dim)))
    self.vit = nnx.List([Block(m.vit_dim, m.vit_heads, m.mlp_ratio, rngs=rngs) for _ in range(m.vit_layers)])
    self.cls_head = nnx.Linear(m.vit_dim, 10, rngs=rngs)
    self.vln = nnx.LayerNorm(m.vit_dim, rngs=rngs)
    self.proj = nnx.Linear(m.vit_dim, m.lm_dim, rngs=rngs)
    self.tok = nnx.Embed(len(WORDS), m.lm_dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (n + PROMPT, m.lm_dim)))
    self.lm = nnx.List([Block(m.lm_dim, m.lm_heads, m.mlp_ratio, mask=masks.Causal(), rngs=rngs)
                        for _ in range(m.lm_layers)])
    self.ln = nnx.LayerNorm(m.lm_dim, rngs=rngs)
    self.head = nnx.Linear(m.lm_dim, len(WORDS), rngs=rngs)

  def __call__(self, images, tokens, length):
    vis, cls_logits, _ = vit_forward(self, images)
    return answer_logits(self, lm_forward(self, vis, tokens), length), cls_logits


def layer_qk(blk: Block, x):
  """Queries ``[B, L, H, D]`` and keys ``[B, L, G, D]`` that ``blk``'s attention computes from ``x``."""
  h = blk.ln1(x)
  return blk.attn.query(h), blk.attn.key(h)


def neighbourhoods(images, patch: int):
  """``images [B, S, S] -> [B, (S / patch)^2, 9 patch^2]``: each patch with its 8 neighbours (zeros off the canvas),
  row-major patch order."""
  images = jnp.asarray(images, jnp.float32)
  padded = jnp.pad(images, ((0, 0), (patch, patch), (patch, patch)))
  S = images.shape[1]
  shifted = [patchify(padded[:, dy:dy + S, dx:dx + S], patch) for dy in (0, patch, 2 * patch)
             for dx in (0, patch, 2 * patch)]
  return jnp.concatenate(shifted, axis=-1)


def local_stem(model: "PruneVLM", images):
  """Patch tokens ``[B, N, d]`` from each patch's 3 x 3 neighbourhood (a two-layer MLP: local features only)."""
  return model.embed2(jax.nn.gelu(model.embed(neighbourhoods(images, model.patch))))


def vit_forward(model: PruneVLM, images, *, want_qk: bool = False):
  """``(projected visual tokens [B, N, d], [CLS] logits [B, 10], per-block (q, k) over [CLS; patches] or None)``."""
  x = local_stem(model, images)
  B = x.shape[0]
  x = jnp.concatenate([jnp.broadcast_to(model.cls[...], (B, 1, x.shape[-1])), x], axis=1) + model.vpos[...]
  feats = x[:, 1:] if model.feature_layer == 0 else None
  qks = []
  for i, blk in enumerate(model.vit):
    if want_qk:
      qks.append(layer_qk(blk, x))
    x = blk(x)
    if i + 1 == model.feature_layer:
      feats = x[:, 1:]
  x = model.vln(x)
  return model.proj(feats), model.cls_head(x[:, 0]), (qks if want_qk else None)


def lm_forward(model: PruneVLM, vis, tokens, plan=(), *, stop: int | None = None, executor: str = "gather"):
  """Runs the LM over ``[vis; tokens]``, pruning visual tokens per ``plan``.

  Args:
    vis: ``[B, N, d]`` projected visual tokens; tokens: ``[B, P]`` prompt ids (right-padded).
    plan: ``((layer, idx [B, k]), ...)``, layers ascending, ``idx`` indices into the ORIGINAL ``N`` tokens, each
      stage's a subset of the previous stage's (:func:`jaxattn.prune.compose`).
    stop: return the hidden state entering block ``stop`` (and the current visual count) instead of the outputs.
    executor: ``"gather"`` (shorter sequence) or ``"mask"`` (segment ids; static length).

  Returns:
    ``h [B, P, d]`` the final normalised text states, or ``(x, n_vis)`` when ``stop`` is given.
  """
  N, P = vis.shape[1], tokens.shape[1]
  x = jnp.concatenate([vis, model.tok(tokens)], axis=1) + model.pos[...][:N + P]
  stages = dict(plan)
  cur, n, ids = None, N, None
  for l, blk in enumerate(model.lm):
    if l in stages:
      idx = stages[l]
      if executor == "gather":
        local = idx if cur is None else jax.vmap(jnp.searchsorted)(cur, idx)
        x = prune.gather_keep(x, local, start=0, num=n)
        cur, n = idx, idx.shape[1]
      else:
        ids = prune.prune_segment_ids(prune.keep_mask(idx, N), num_text=P)
    if stop == l:
      return x, n
    x = blk(x, segment_ids=None if ids is None else (ids, ids))
  return model.ln(x[:, x.shape[1] - P:])


def answer_logits(model: PruneVLM, h, length):
  """Logits ``[B, V]`` at each record's last prompt token (``h [B, P, d]``, ``length [B]``)."""
  last = jnp.take_along_axis(h, (length - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
  return model.head(last)
