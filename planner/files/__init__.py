"""The bottom layer of planner: generic file helpers that every other package may use.

Owns: the one atomic writer (:mod:`.atomic`), the rule for a command's inputs and outputs and
reading user files safely (:mod:`.paths`, :mod:`.tensors`), the on-disk cache of computed arrays
(:mod:`.cache`) and the fingerprints of a model's weight files (:mod:`.fingerprint`).
May import: the standard library, torch, safetensors, loftq and ``planner.errors``; nothing else of
planner (every other planner package imports this one).
"""
