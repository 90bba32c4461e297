"""The quality benches' evaluation: two texts, perplexity and KL divergence (no script here).

Texts: ``test``, the pydoc test split (the calibration corpus's held-out part), and ``ood``, the
out-of-domain text shipped in bench/texts/ (three FSF licence texts, verified against
MANIFEST.json; never calibrated or trained on). Row fields of a causal LM, per text (suffix "" for
``test``, the names the result files always had; ``_ood`` for ``ood``):

    ppl_before{sfx}          perplexity of the step-0 model
    kld_before{sfx}          {mean, p99, tokens}: per-token KL(P_fp32 || P) to the unquantized model
    ppl_after{sfx}, ppl_after{sfx}_std, ppl_after{sfx}_seeds    after fine-tuning, over seeds
    kld_lora16_after{sfx}    KL to the fine-tuned lora-16bit of the same seed: {mean, mean_std, p99
                             (mean over seeds), tokens, seeds: [{mean, p99}, ...]} (absent on the
                             lora-16bit row itself, and when the bench runs without the ceiling)

After fine-tuning the reference is the 16-bit LoRA, not the unquantized model: fine-tuning moves
every row away from the latter on purpose, and one reference per model keeps the evaluation at
three forward passes per block (candidate, fp32 at step 0, lora-16bit after).

All of it from :func:`planner.train.kld.score_blocks`: one pass per model and text gives the NLL
and the KL to every reference, block by block.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from planner.scoring.ftproxy import FinetuneSettings, finetune
from planner.train.data import Split, load_eval_text
from planner.train.kld import KLDSummary, TextScore, score_blocks

OOD_MANIFEST = Path(__file__).resolve().parent / "texts" / "MANIFEST.json"
SUFFIX = {"test": "", "ood": "_ood"}  # text -> row-field suffix
EVAL_BATCH = 4  # blocks per forward pass


def ood_text() -> Split:
    """The out-of-domain text, each file checked against its sha256 (PlannerError on a mismatch)."""
    return load_eval_text(OOD_MANIFEST)


def spread(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` of ``blocks`` [N, seq_len] at evenly spaced indices (all of them if N <= n): a small
    evaluation still sees every document of the text, not only the first."""
    if blocks.shape[0] <= n:
        return blocks
    return blocks[torch.linspace(0, blocks.shape[0] - 1, n).round().long()]


def describe_texts(texts: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What a result file records about its texts: blocks, tokens per block, origin."""
    origin = {"test": "pydoc test split (planner.train.data, seed 0)",
              "ood": f"bench/texts/{OOD_MANIFEST.name} (sha256-verified; spread over the whole text)"}
    return {t: {"blocks": int(b.shape[0]), "seq_len": int(b.shape[1]), "origin": origin.get(t, t)}
            for t, b in texts.items()}


class Ceiling:
    """lora-16bit (the bf16 backbone with rank-16 adapters everywhere, PEFT's default init) fine-tuned
    per seed exactly as every row is, trained once on first use and kept as its trained tensors."""

    def __init__(self, bank: Any, names: list[str], train: torch.Tensor, steps: int, lr: float) -> None:
        self.bank, self.assignment = bank, {n: (16, 16) for n in names}
        self.train, self.steps, self.lr = train, steps, lr
        self._state: dict[int, dict[str, torch.Tensor]] = {}
        self.seconds: dict[int, float] = {}

    def model(self, seed: int) -> torch.nn.Module:
        """The fine-tuned lora-16bit of ``seed`` (built fresh; trained the first time)."""
        torch.manual_seed(seed)
        net = self.bank.build(self.assignment, init="default")
        if seed not in self._state:
            t0 = time.perf_counter()
            finetune(net, self.train, FinetuneSettings(steps=self.steps, lr=self.lr, seed=seed))
            self.seconds[seed] = time.perf_counter() - t0
            self._state[seed] = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
        else:
            state = self._state[seed]
            with torch.no_grad():
                for n, p in net.named_parameters():
                    if n in state:
                        p.copy_(state[n])
        return net


def score_texts(net: torch.nn.Module, texts: Mapping[str, torch.Tensor],
                references: Mapping[str, torch.nn.Module]) -> dict[str, TextScore]:
    return {t: score_blocks(net, blocks, references, batch_size=EVAL_BATCH) for t, blocks in texts.items()}


def _over_seeds(per_seed: list[KLDSummary]) -> dict[str, Any]:
    means = [k.mean for k in per_seed]
    return {"mean": statistics.mean(means), "mean_std": statistics.stdev(means) if len(means) > 1 else 0.0,
            "p99": statistics.mean(k.p99 for k in per_seed), "tokens": per_seed[0].tokens,
            "seeds": [{"mean": k.mean, "p99": k.p99} for k in per_seed]}


def row_fields(before: Mapping[str, TextScore], after: Mapping[str, list[TextScore]]) -> dict[str, Any]:
    """The row fields of the module docstring from the step-0 scores and the per-seed ones."""
    out: dict[str, Any] = {}
    for text, sfx in SUFFIX.items():
        if text not in before:
            continue
        ppl = [a.ppl for a in after[text]]
        out[f"ppl_before{sfx}"] = before[text].ppl
        out[f"kld_before{sfx}"] = before[text].kld["fp32"].to_dict()
        out.update({f"ppl_after{sfx}": statistics.mean(ppl),
                    f"ppl_after{sfx}_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                    f"ppl_after{sfx}_seeds": ppl})
        per_seed = [a.kld["lora16"] for a in after[text] if "lora16" in a.kld]
        if per_seed:
            out[f"kld_lora16_after{sfx}"] = _over_seeds(per_seed)
    return out


RESULT_FIELDS = tuple(f"{name}{sfx}" for sfx in SUFFIX.values()
                      for name in ("ppl_before", "kld_before", "ppl_after", "kld_lora16_after")) + \
    tuple(f"ppl_after{sfx}_{x}" for sfx in SUFFIX.values() for x in ("std", "seeds")) + ("ft_seconds", "trained")
