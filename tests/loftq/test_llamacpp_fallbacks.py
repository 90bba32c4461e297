"""The fallbacks are llama.cpp's (issue 28, part 5): on a row that is not whole blocks of the type
asked for, our GGUF format stores the type that the built ``llama-quantize`` stored, tensor by
tensor, in its logs on SmolLM2 (``data/llama_quantize_fallbacks.txt``: its header names the
llama.cpp commit and the commands; written by ``python -m bench.llamacpp_frontier --fallbacks``).
Reads only that fixture: no tool runs here."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.llamacpp_tools import QuantizedTensor, quantize_log_tensors
from loftq.formats.gguf import stored_type
from loftq.gguf_quants import GGUF_TYPES

FIXTURE = Path(__file__).parent / "data" / "llama_quantize_fallbacks.txt"
# our K-quant-sized types: each must have met llama.cpp's fallback on a 576-wide SmolLM2 row
SUPER_BLOCK_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs")


def recipes() -> dict[str, list[QuantizedTensor]]:
    """Recipe -> the tensors of its log section, parsed as the bench parses whole logs."""
    sections: dict[str, list[str]] = {}
    name = None
    for line in FIXTURE.read_text().splitlines():
        if line.startswith("== "):
            name = line[3:].strip()
            sections[name] = []
        elif name is not None and not line.startswith("#"):
            sections[name].append(line)
    return {k: quantize_log_tensors("\n".join(v)) for k, v in sections.items()}


RECIPES = recipes()
ALL = [(r, t) for r, tensors in RECIPES.items() for t in tensors]
# the tensors whose asked and stored types are both ours (the IQ2/IQ3 types of its IQ3_XXS recipe are not)
CASES = [(r, t) for r, t in ALL if (t.requested or t.stored) in GGUF_TYPES and t.stored in GGUF_TYPES]


def test_fixture_covers_the_recipes_and_types() -> None:
    assert {"Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS"} <= set(RECIPES)
    met = {t.requested for _, t in CASES if t.requested is not None and t.shape[1] == 576}
    assert set(SUPER_BLOCK_TYPES) <= met, f"no fallback seen for {sorted(set(SUPER_BLOCK_TYPES) - met)}"
    others = {(t.requested or t.stored) for _, t in ALL} - set(GGUF_TYPES)
    assert others <= {"iq2_s", "iq3_xxs", "iq3_s"}, f"types of llama.cpp's logs we do not register: {sorted(others)}"


@pytest.mark.parametrize("recipe,tensor", CASES, ids=[f"{r}-{t.name}" for r, t in CASES])
def test_stored_type_is_llama_cpps(recipe: str, tensor: QuantizedTensor) -> None:
    """A fallback: the type asked for, on this row, is stored as llama.cpp's replacement. No
    fallback: the stored type fits the row as it is (our chain leaves it alone)."""
    assert stored_type(tensor.requested or tensor.stored, tensor.shape) == tensor.stored
    if tensor.requested is not None:
        assert tensor.fallback == tensor.stored  # the warning names the type it then converts to
        assert tensor.shape[1] % GGUF_TYPES.get(tensor.requested).block_size != 0
