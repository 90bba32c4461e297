"""The quantized model at run time: :class:`QuantLinear` (packed codes, re-dequantized in backward),
the dequantizer registry, LoRA surgery, LoftQ-initialised in-memory models, and ``load(DIR)``.

May import ``loftq``, ``search_spaces``, :mod:`planner.artifact` (to read a folder) and the
top-level modules; never ``train``, ``scoring``, ``search`` or ``cli``.
"""
