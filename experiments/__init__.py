"""Experiments: ``python -m experiments <name> [args]``.

Each subcommand is a ``"module:function"`` string, imported only when it runs (so listing them imports no jax).
Adding one is one line in :data:`SUBCOMMANDS`; the function takes the remaining argv and returns an exit code.
"""

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line description)
    "bench": ("experiments.bench.run:main", "time attention implementations side by side with the anchors"),
    "passkey": ("experiments.passkey.run:main", "landmark attention: passkey retrieval beyond the training length "
                                                "with top-k block retrieval vs a window baseline"),
    "mqar": ("experiments.mqar.run:main", "Zoology MQAR: recall accuracy of attention vs gated convolutions vs "
                                          "linear attention vs sparse-attention hybrid"),
    "gpu_compile": ("experiments.gpu_compile.run:main", "compile every GPU kernel for sm_90 / sm_80 without a GPU "
                                                        "and report shared memory per kernel"),
    "tpu_compile": ("experiments.tpu_compile.run:main", "compile every TPU kernel and context-parallel strategy for "
                                                        "v4 / v5e / v5p / v6e without a TPU: VMEM, collectives"),
    "decode_bench": ("experiments.decode_bench.run:main", "decode-step time against context length: dense vs "
                                                         "K = L/8 sparse decode_attention, jax.nn beside"),
    "cp_model": ("experiments.cp_model.run:main", "context-parallel cost model: per-device FLOPs, bytes, imbalance "
                                                  "and modelled step time of ring/all-gather/Ulysses/USP"),
    "sparse_frontier": ("experiments.sparse_frontier.run:main", "Sparse Frontier: a tiny LM's accuracy and attention "
                                                                "recall vs sparsity, sparse prefill vs decode, N and 2N"),
}
