"""The llama.cpp frontier bench's report: verdicts against issue 28's goals, the README table and
the plot (mean KLD against model + adapter bytes, both texts). Reads result rows only.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

TEXTS = {"test": "pydoc test split", "ood": "out-of-domain (bench/texts)"}
PEER = "llama.cpp + imatrix"
TEN_PCT = ("Q3_K_M", "IQ4_XS", "Q4_K_M", "Q5_K_M")  # issue 28: >= 10 % lower KLD from Q3_K_M's bytes to Q5_K_M's


def _pair(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:  # ablation rows ("planner --bits ...") are neither side of a verdict
        if r["kind"] in ("planner", PEER):
            out.setdefault(r["recipe"], {})["ours" if r["kind"] == "planner" else "peer"] = r
    return {k: v for k, v in out.items() if len(v) == 2}


def compare(ours: dict[str, Any], peer: dict[str, Any], goal: float) -> dict[str, Any]:
    """One text: the KLD ratio and whether ours is ``goal`` x the peer's KLD or lower with both
    errors counted against it (ours + its ± <= goal x (peer - its ±)); PPL likewise at 1.0."""
    k_ours, k_peer = ours["kld_mean"], peer["kld_mean"]
    e_ours, e_peer = ours["kld_mean_err"], peer["kld_mean_err"]
    p_ours, p_peer = ours["ppl"], peer["ppl"]
    return {"kld_ratio": k_ours / k_peer, "kld_goal": goal, "kld_goal_met": k_ours + e_ours <= goal * (k_peer - e_peer),
            "kld_lower_beyond_error": k_peer - k_ours > e_ours + e_peer,
            "ppl_ratio": p_ours / p_peer, "ppl_not_worse": p_ours - p_peer <= ours["ppl_err"] + peer["ppl_err"]}


def verdicts(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per recipe with a plan: per text, :func:`compare` at the issue's goal (0.9 or 1.0)."""
    out = {}
    for recipe, pair in _pair(rows).items():
        goal = 0.9 if recipe in TEN_PCT else 1.0
        out[recipe] = {t: compare(pair["ours"][t], pair["peer"][t], goal) for t in TEXTS
                       if t in pair["ours"] and t in pair["peer"]}
    return out


def _types(types: dict[str, int]) -> str:
    return ", ".join(f"{n} {t}" for t, n in types.items())


def table(result: dict[str, Any]) -> str:
    head = ("| recipe | file | effective types (210 targets) | MB (model + adapter) | test PPL | test KLD mean | test KLD p99 "
            "| ood PPL | ood KLD mean | ood KLD p99 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ref = result["reference"]
    lines.append(f"| f32 reference | ref-f32.gguf | all f32 | {ref['bytes'] / 1e6:.1f} | "
                 f"{ref['test']['ppl']:.3f} ± {ref['test']['ppl_err']:.3f} | 0 | 0 | "
                 f"{ref['ood']['ppl']:.3f} ± {ref['ood']['ppl_err']:.3f} | 0 | 0 |")
    for r in sorted(result["rows"], key=lambda r: (r["total_bytes"], r["kind"])):
        who = (f"llama.cpp {r['recipe']} + imatrix" if r["kind"] == PEER else
               f"**planner at {r['recipe']}'s bytes** ({r['adapters']} adapters)" if r["kind"] == "planner" else
               f"{r['kind']} at {r['recipe']}'s bytes ({r['adapters']} adapters)")
        size = f"{r['model_bytes'] / 1e6:.2f}" + (f" + {r['adapter_bytes'] / 1e6:.2f}" if r["adapter_bytes"] else "")
        cells = [who, _types(r["types"]), size]
        for t in TEXTS:
            s = r.get(t)
            cells += [f"{s['ppl']:.3f} ± {s['ppl_err']:.3f}", f"{s['kld_mean']:.4f} ± {s['kld_mean_err']:.4f}",
                      f"{s['kld_p99']:.3f}"] if s else ["–"] * 3
        lines.append("| " + r["recipe"] + " | " + " | ".join(cells) + " |")
    lines += ["", "| recipe | text | KLD ours / peer | goal | met (beyond ±) | PPL ours / peer | PPL not worse |",
              "|---|---|---|---|---|---|---|"]
    for recipe, per_text in result.get("verdicts", {}).items():
        for t, v in per_text.items():
            lines.append(f"| {recipe} | {t} | {v['kld_ratio']:.3f} | ≤ {v['kld_goal']:.1f} | "
                         f"{'yes' if v['kld_goal_met'] else 'no'} | {v['ppl_ratio']:.3f} | "
                         f"{'yes' if v['ppl_not_worse'] else 'no'} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Mean KLD (log scale, with llama-perplexity's ±) against model + adapter MB, one panel per text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from planner.files.atomic import atomic_write_bytes

    fig, axes = plt.subplots(1, len(TEXTS), figsize=(12, 4.8))
    styles = {PEER: dict(marker="o", color="tab:blue"), "planner": dict(marker="s", color="tab:red")}
    for kind in sorted({r["kind"] for r in result["rows"]} - set(styles)):  # ablations
        styles[kind] = dict(marker="^", color="tab:gray", linestyle="none")
    for ax, (text, title) in zip(axes, TEXTS.items()):
        for kind, style in styles.items():
            rows = sorted((r for r in result["rows"] if r["kind"] == kind and text in r), key=lambda r: r["total_bytes"])
            if not rows:
                continue
            x = [r["total_bytes"] / 1e6 for r in rows]
            y = [r[text]["kld_mean"] for r in rows]
            ax.errorbar(x, y, yerr=[r[text]["kld_mean_err"] for r in rows], label=kind, capsize=2, **style)
            for xi, yi, r in zip(x, y, rows):
                ax.annotate(r["recipe"], (xi, yi), fontsize=7, xytext=(4, 3 if kind == "planner" else -9),
                            textcoords="offset points", color=style["color"])
        ax.set_yscale("log")
        ax.set_xlabel("model.gguf + adapter.gguf (MB)")
        ax.set_ylabel("mean KL divergence to the f32 model (nats/token)")
        scored = next((r[text].get("scored_tokens") for r in result["rows"] if text in r), None)
        ax.set_title(f"{title}, {scored} scored tokens" if scored else title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M at equal bytes: llama.cpp's recipes with imatrix vs the planner "
                 f"(llama-perplexity --kl-divergence, llama.cpp {result['llama_cpp']}, -c {result['ctx']})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
