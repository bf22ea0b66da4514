"""Experiments: ``python -m experiments <name> [args]``.

Each subcommand is a ``"module:function"`` string, imported only when it runs (so listing them imports no jax).
Adding one is one line in :data:`SUBCOMMANDS`; the function takes the remaining argv and returns an exit code.
"""

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line description)
    "bayes_pfl": ("experiments.bayes_pfl.run:main", "Bayes-PFL RCA: zero-shot patch localisation of unseen digit "
                                                    "classes, residual cross-attention vs static prompts"),
    "crosstune": ("experiments.crosstune.run:main", "CrossTune: few-shot topics over frozen features, label-"
                                                    "description cross-attention head vs linear probe / prototype"),
    "lxmert": ("experiments.lxmert.run:main", "LXMERT toy relational VQA: co-attention vs single-stream at equal "
                                              "parameters, question-only and majority baselines"),
    "pink": ("experiments.pink.run:main", "Pink referring tasks (box-as-text) on the toy VLM: grounding IoU and "
                                          "referring accuracy vs no-image and random-box baselines"),
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
    "cab": ("experiments.cab.run:main", "CAB: efficiency length of the efficient-attention zoo vs dense softmax, a "
                                        "mini benchmark per attention pattern with the compositional index"),
    "halonet": ("experiments.halonet.run:main", "HaloNet: blocked local 2-D attention vs a conv net vs global "
                                                "attention on digit canvases at equal parameters (accuracy, FLOPs)"),
    "act": ("experiments.act.run:main", "ACT: hidden attention sinks per head and accuracy with attention calibration "
                                        "on searched vs random vs all heads of a small in-context classifier"),
    "cross_saliency": ("experiments.cross_saliency.run:main", "cross-attention vs gradient saliency (Pearson r per "
                                                              "layer and head aggregation) on a toy seq2seq task"),
    "retrieval_heads": ("experiments.retrieval_heads.run:main", "Retrieval Head: retrieval scores of a tiny "
                                                                "decoder's heads, needle recall with top-k vs random "
                                                                "heads masked"),
    "recycled": ("experiments.recycled.run:main", "Recycled Attention: attention-mass recovery vs steps since the full "
                                                  "step, decode NLL of recycled vs StreamingLLM/H2O/SnapKV at K=N/8"),
    "dse": ("experiments.dse.run:main", "DSE: cross-encoder teacher vs distilled / contrastive / untrained bi-encoders on "
                                        "template paraphrases, accuracy and all-pairs scoring speed"),
    "posir": ("experiments.posir.run:main", "KaLM-style contrastive retrievers (causal vs bidirectional, pooling, focal / "
                                            "hard negatives) and PosIR's position profile, BM25 beside"),
    "attnres": ("experiments.attnres.run:main", "Attention Residuals: a tiny stdlib-text LM with standard vs Full vs "
                                                "Block AttnRes residuals, overheads, two-phase inference"),
    "transnormer": ("experiments.transnormer.run:main", "TransNormerLLM: decayed linear attention vs softmax LM at "
                                                        "equal parameters and tokens, long-sequence speed table"),
    "sparse_frontier": ("experiments.sparse_frontier.run:main", "Sparse Frontier: a tiny LM's accuracy and attention "
                                                                "recall vs sparsity, sparse prefill vs decode, N and 2N"),
    "prune": ("experiments.prune.run:main", "visual-token pruning on a toy VLM: accuracy vs kept fraction for [CLS] / "
                                            "text-guided scorers, debiasing, multi-stage, random/norm/oracle"),
}
