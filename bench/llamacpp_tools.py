"""llama.cpp's command-line tools (``bench/build_llamacpp_tools.sh``) run from the benches, and
what their logs say: per-tensor types from ``llama-quantize``, PPL and KL divergence from
``llama-perplexity``. No model code here: text in, numbers out.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools" / "llama.cpp"
BIN = TOOLS / "bin"
NAMES = ("llama-quantize", "llama-imatrix", "llama-perplexity")


def missing_tools() -> str | None:
    """One line naming the tools that are not built, or None when all three are there."""
    gone = [t for t in NAMES if not (BIN / t).is_file()]
    if not gone:
        return None
    return f"{', '.join(gone)} not in {BIN.relative_to(ROOT)}: run bash bench/build_llamacpp_tools.sh"


def built_commit() -> str:
    """The llama.cpp commit the build script recorded (``.tools/llama.cpp/BUILT``)."""
    stamp = TOOLS / "BUILT"
    lines = stamp.read_text().splitlines() if stamp.is_file() else []
    return lines[1].split()[-1] if len(lines) > 1 else "unknown"


@dataclass
class ToolRun:
    """One command: as written for a reader (tools by name, paths relative to ``rel``), its wall time and log."""

    command: str
    seconds: float
    log: str = field(repr=False)


def run_tool(name: str, *args: object, rel: Path | None = None, log_path: Path | None = None) -> ToolRun:
    """Run ``BIN/name args`` with stdout and stderr merged (llama.cpp interleaves its warnings with
    its progress lines, and the fallback warnings must stay next to their tensor). A failure stops
    the bench with the command and the log's tail."""
    argv = [str(BIN / name), *(str(a) for a in args)]
    shown = [name] + [_short(a, rel) for a in argv[1:]]
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    seconds = time.perf_counter() - start
    command = " ".join(shlex.quote(s) for s in shown)
    print(f"$ {command}  -> exit {done.returncode}, {seconds:.1f} s", flush=True)
    if done.returncode:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
    if log_path is not None:  # written only on success: a rerun redoes a step whose log is absent
        log_path.write_text(f"$ {command}\n{done.stdout}")
    return ToolRun(command, round(seconds, 1), done.stdout)


def _short(arg: str, rel: Path | None) -> str:
    if rel is not None and arg.startswith(str(rel) + "/"):
        return arg[len(str(rel)) + 1:]
    return arg


# ---------------------------------------------------------------- llama-quantize
_TENSOR = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[\s*(\d+),\s*(\d+),")
# its first pass over the tensors warns, one line each, before any is converted
_FALLBACK = re.compile(r"warning:\s+(\S+)\s+-\s+ncols\s+\d+ not divisible by \d+ \(required for type\s+(\S+)\)"
                       r"\s*->\s*falling back to\s+(\S+)")
_CONVERT = re.compile(r"converting to (\S+?) \.\.")


@dataclass(frozen=True)
class QuantizedTensor:
    """One tensor of a quantize log: ``shape`` [rows, cols] (GGUF writes [cols, rows]), the type
    stored, and where llama.cpp warned of a fallback, the type asked for and the one it named."""

    name: str
    shape: tuple[int, int]
    stored: str
    requested: str | None = None
    fallback: str | None = None


def quantize_log_tensors(log: str) -> list[QuantizedTensor]:
    """Every converted tensor of a ``llama-quantize`` log, in order (type names lower case; a
    tensor copied as it is, e.g. a norm in f32, is left out)."""
    warned = {m.group(1): (m.group(2).lower(), m.group(3).lower()) for m in _FALLBACK.finditer(log)}
    out, current = [], None
    for line in log.splitlines():
        if m := _TENSOR.search(line):
            current = (m.group(1), (int(m.group(3)), int(m.group(2))))
        if (m := _CONVERT.search(line)) and current is not None:
            requested, fallback = warned.get(current[0], (None, None))
            out.append(QuantizedTensor(current[0], current[1], m.group(1).lower(), requested, fallback))
            current = None
    return out


def effective_types(tensors: list[QuantizedTensor], prefix: str = "blk.") -> dict[str, int]:
    """Stored type -> number of tensors whose names start with ``prefix``, most frequent first."""
    return dict(Counter(t.stored for t in tensors if t.name.startswith(prefix)).most_common())


def types_by_module(named: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """(``blk.N.MODULE.weight``, type) pairs -> MODULE -> type -> count: which layers took which types."""
    out: dict[str, Counter] = {}
    for name, qtype in named:
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4:
            out.setdefault(parts[2], Counter())[qtype] += 1
    return {m: dict(c.most_common()) for m, c in sorted(out.items())}


# ---------------------------------------------------------------- llama-perplexity
_NUM = r"(-?[\d.]+(?:e[-+]?\d+)?)"
_PM = rf"{_NUM}\s*(?:±|\+/-)\s*{_NUM}"
_KLD_FIELDS = {
    "ppl": rf"Mean PPL\(Q\)\s*:\s*{_PM}",
    "ppl_base": rf"Mean PPL\(base\)\s*:\s*{_PM}",
    "ln_ppl_ratio": rf"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{_PM}",
    "kld_mean": rf"Mean\s+KLD:\s*{_PM}",
    "kld_p99": rf"99\.0%\s+KLD:\s*{_NUM}",
    "kld_median": rf"Median\s+KLD:\s*{_NUM}",
    "kld_max": rf"Maximum KLD:\s*{_NUM}",
    "same_top_p": rf"Same top p:\s*{_PM}",
}


def perplexity_final(log: str) -> dict[str, float]:
    """``Final estimate: PPL = x +/- e`` and the chunk count of a plain ``llama-perplexity`` run."""
    m = re.search(rf"Final estimate: PPL = {_PM}", log)
    if m is None:
        raise ValueError("no 'Final estimate' in the llama-perplexity log")
    return {"ppl": float(m.group(1)), "ppl_err": float(m.group(2)), **_chunks(log)}


def kld_stats(log: str) -> dict[str, float]:
    """The statistics of a ``llama-perplexity --kl-divergence`` run: each field of ``_KLD_FIELDS``
    (with ``_err``, the tool's own ±, where it prints one), and the chunks scored."""
    out: dict[str, float] = {}
    for key, pattern in _KLD_FIELDS.items():
        m = re.search(pattern, log)
        if m is None:
            raise ValueError(f"no {key} in the llama-perplexity --kl-divergence log")
        out[key] = float(m.group(1))
        if m.lastindex and m.lastindex > 1:
            out[f"{key}_err"] = float(m.group(2))
    return {**out, **_chunks(log)}


def _chunks(log: str) -> dict[str, float]:
    m = re.search(r"over (\d+) chunks, n_ctx=(\d+)", log)
    if m is None:
        return {}
    chunks, ctx = int(m.group(1)), int(m.group(2))
    # it scores tokens n_ctx/2 .. n_ctx-2 of each window (the last one has no next token)
    return {"chunks": chunks, "n_ctx": ctx, "scored_tokens": chunks * (ctx - 1 - ctx // 2)}
