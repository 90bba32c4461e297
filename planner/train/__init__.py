"""Training: the one LoRA training loop, optimizer and held-out evaluation (used by ``finetune`` and
by the fine-tune proxy alike), the calibration / training corpus with its fixed splits and the
verified evaluation texts (:mod:`.data`), and per-token KL divergence + NLL against a reference
model (:mod:`.kld`, the quality benches' one measure of distance).

May import ``runtime`` and the top-level modules; never ``scoring``, ``search`` or ``cli``.
"""
