"""Raw Pallas kernels (jax only, no autodiff). Internal to jaxattn: import ``jaxattn`` instead."""
