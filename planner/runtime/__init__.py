"""The quantized model at run time: :class:`QuantLinear` (a format's stored tensors, re-dequantized in
backward), LoRA surgery, the one builder (:mod:`.build`: a layer choice + weight -> stored weight and
adapter init; a model assembled from such layers), in-memory LoftQ models and ``load(DIR)``.

May import ``loftq``, ``search_spaces``, :mod:`planner.sources`, :mod:`planner.artifact` (to read a
folder) and everything below; never ``train``, ``scoring``, ``search``, ``build``, ``verify`` or ``cli``.
"""
