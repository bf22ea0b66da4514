"""Sanity check of a (TPU) JAX installation: devices, a psum over every device, and jaxattn's attention.

    python tpu_setup/check_tpu.py [--distributed] [--pallas]

Prints the devices this process sees (and, with ``--distributed``, initialises multi-host JAX first, so the psum
spans every host), sums one value per device with ``shard_map`` + ``psum`` (the answer must be the device count),
and runs a small causal ``jaxattn.softmax_attention`` against the dense reference. On a TPU the default
implementation is the Pallas TPU kernel; ``--pallas`` forces the kernel on other backends too (interpret mode on
CPU: slow, for testing the script). Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
  p.add_argument("--pallas", action="store_true", help="use implementation='pallas_tpu' on any backend")
  args = p.parse_args(argv)

  import jax
  if args.distributed:
    jax.distributed.initialize()
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import PartitionSpec as P

  import jaxattn
  from jaxattn import masks

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, process {jax.process_index()} of "
        f"{jax.process_count()}")
  print(f"{jax.device_count()} devices ({jax.local_device_count()} local): "
        f"{sorted({d.device_kind for d in jax.devices()})}")
  ok = True

  mesh = jax.make_mesh((jax.device_count(),), ("i",))
  ones = jax.device_put(jnp.ones((jax.device_count(),), jnp.float32), jax.sharding.NamedSharding(mesh, P("i")))
  total = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "i"), mesh=mesh, in_specs=P("i"), out_specs=P()))(ones)
  total = float(np.asarray(jax.device_get(total)).reshape(-1)[0])
  psum_ok = total == jax.device_count()
  ok &= psum_ok
  print(f"psum over {jax.device_count()} devices = {total:g}: {'ok' if psum_ok else 'WRONG'}")

  impl = "pallas_tpu" if args.pallas else None
  q, k, v = jaxattn.testing.random_qkv(jax.random.key(0), B=1, T=256, H=2, G=1, D=128)
  t0 = time.perf_counter()
  out = jax.block_until_ready(jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), implementation=impl))
  dt = time.perf_counter() - t0
  ref = jaxattn.softmax_attention(q, k, v, mask=masks.Causal(), implementation="reference")
  err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
  attn_ok = err < 1e-2
  ok &= attn_ok
  print(f"softmax_attention (implementation={impl or 'default'}) vs reference: max |diff| = {err:.2e} "
        f"({dt:.2f} s incl. compile): {'ok' if attn_ok else 'WRONG'}")
  print("all checks passed" if ok else "SOME CHECKS FAILED")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
