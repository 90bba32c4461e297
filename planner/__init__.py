from .loading import load  # noqa: F401  (planner.load(DIR, device=None, dtype=None) -> trainable PeftModel)
