"""What a choice costs the model: residual tables, Fisher sensitivity, the weight bank of quantized
candidates, the zero-step proxy (KL / embedding cosine) and the fine-tune proxy; the layers' input
second moments for the data-aware initialisation (:mod:`.moments`).

May import ``runtime``, ``train`` and the top-level modules; never ``search`` or ``cli``.
"""
