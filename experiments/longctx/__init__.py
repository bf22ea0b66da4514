"""The tiny long-context LM shared by ``sparse_frontier`` and ``recycled``: synthetic tasks (:mod:`.tasks`), the
decoder (:mod:`.model`), its cached training (:mod:`.train`) and inference with a chosen sparse prefill or decode
cache policy (:mod:`.infer`)."""
