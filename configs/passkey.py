"""Presets for ``python -m experiments passkey``: a small landmark-attention LM on the passkey retrieval task.

Lengths are augmented lengths (landmark tokens included) and multiples of ``block_size``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PasskeyConfig:
  """One run: model, training and evaluation.

  Attributes:
    num_layers, d_model, num_heads, num_kv_heads, mlp_ratio: the decoder (pre-norm blocks, RoPE, GQA when
      ``num_kv_heads < num_heads``).
    block_size: landmark block (``block_size - 1`` regular tokens + 1 landmark).
    train_length: training sequence length.
    batch_size, steps, learning_rate, warmup_steps, weight_decay: AdamW with linear warmup then cosine decay.
    answer_weight: loss weight of the 5 answer digits (every other regular token has weight 1).
    seed: parameter and data seed.
    eval_lengths: prompt lengths to evaluate.
    top_ks: retrieval top-k values (blocks per query and head).
    eval_samples: prompts per length (the same prompts for every method).
    eval_batch: prompts per evaluation batch.
    chunk_size: tokens per chunk when decoding with the cache (the local frame is the chunk plus the incomplete
      block before it).
    retrieval_mode: ``"per_token_and_head"``, ``"max_over_heads"`` or ``"max_over_tokens"``.
    log_every: training log / tqdm update period (steps).
  """

  num_layers: int = 3
  d_model: int = 64
  num_heads: int = 2
  num_kv_heads: int = 2
  mlp_ratio: int = 4
  block_size: int = 16
  train_length: int = 256
  batch_size: int = 16
  steps: int = 600
  learning_rate: float = 2e-3
  warmup_steps: int = 100
  weight_decay: float = 0.01
  answer_weight: float = 4.0
  seed: int = 0
  eval_lengths: tuple[int, ...] = (256, 1024, 2048, 4096)
  top_ks: tuple[int, ...] = (1, 2, 4)
  eval_samples: int = 64
  eval_batch: int = 16
  chunk_size: int = 256
  retrieval_mode: str = "per_token_and_head"
  log_every: int = 25

  def __post_init__(self):
    for name in ("train_length", "chunk_size"):
      if getattr(self, name) % self.block_size:
        raise ValueError(f"{name}={getattr(self, name)} must be a multiple of block_size={self.block_size}")
    for L in self.eval_lengths:
      if L % self.block_size:
        raise ValueError(f"eval length {L} must be a multiple of block_size={self.block_size}")
    if self.eval_samples % self.eval_batch:
      raise ValueError(f"eval_samples={self.eval_samples} must be a multiple of eval_batch={self.eval_batch}")

  @property
  def mem_blocks(self) -> int:
    """Ring-buffer blocks: enough for the longest evaluation prompt."""
    return max(max(self.eval_lengths) // self.block_size, max(self.top_ks, default=1))


PRESETS: dict[str, PasskeyConfig] = {
    # CPU: ~5-8 minutes of training on 2 cores (the answer accuracy jumps from 0 to ~1 around step 400), then the
    # evaluation grid (~5 minutes).
    "cpu": PasskeyConfig(),
    # Seconds: wiring check for tests and CI.
    "smoke": PasskeyConfig(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, block_size=16, train_length=128,
                           batch_size=2, steps=2, warmup_steps=1, eval_lengths=(128, 256), top_ks=(1,),
                           eval_samples=2, eval_batch=2, chunk_size=64, log_every=1),
}
