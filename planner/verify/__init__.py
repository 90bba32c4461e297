"""Checking a materialized model against its plan: :mod:`.report` runs a few training steps and
compares measured memory with the memory model term by term; :mod:`.oracle` measures the peak of
live tensor bytes of one step through a trainer (the planner's loop, HF Trainer, TRL).

May import ``train``, ``runtime``, ``build``, ``artifact`` and everything below; never ``cli``.
"""
