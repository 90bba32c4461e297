"""Training: the one LoRA training loop, optimizer and held-out evaluation (used by ``finetune`` and
by the fine-tune proxy alike), and the calibration / training corpus with its fixed splits.

May import ``runtime`` and the top-level modules; never ``scoring``, ``search`` or ``cli``.
"""
