"""Training of IP-Adapter-style adapters: the pieces behind ``train_encoder.py`` (``lookalike-train``).

``config`` (flags -> :class:`~lookalike.training.config.TrainConfig`), ``records`` (JSON/JSONL, image folders,
tar shards), ``data`` (deterministic sample order and per-sample randomness), ``models`` (frozen base models,
the trainable adapter), ``cache`` (precomputed latents and features), ``step`` (the loss), ``checkpoint``
(atomic save, resume, export), ``validation`` (held-out loss and images) and ``loop`` (the named steps).
"""
