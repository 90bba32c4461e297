"""What can be chosen: target layers per architecture, choice sets (widths x ranks) and granularity."""
from .architectures import ARCHITECTURES, ArchRule, rule_for
from .choices import GRANULARITIES, SEARCH_SPACES, SearchSpace, group_key, group_targets
from .discovery import block_path, facts_from_config, find_targets, linear_modules, type_path
from .facts import ModelFacts, TargetLayer
from .widths import Width, is_double_quant, width, width_bits

__all__ = [
    "ARCHITECTURES", "ArchRule", "GRANULARITIES", "ModelFacts", "SEARCH_SPACES", "SearchSpace", "TargetLayer",
    "block_path", "facts_from_config", "find_targets", "group_key", "group_targets", "linear_modules",
    "rule_for", "type_path", "Width", "is_double_quant", "width", "width_bits",
]
