"""What the whole-content weight fingerprint (v3) costs against the partial one (v2), on phi-2's shapes.

    python -m bench.fingerprint_cost [--layers 4] [--work DIR] [--json F]

Writes a safetensors file holding ``--layers`` of phi-2's transformer blocks at fp16 (q, k, v,
dense 2560 x 2560 with biases, fc1 10240 x 2560, fc2 2560 x 10240: 157 MB per block) and times, on
this machine:

- ``content`` (v3): :func:`planner.files.fingerprint.file_digest` with no memo, i.e. every byte
  read and hashed (the file is in the page cache after it is written: the hash's own rate; a cold
  disk adds its read time), and the rate it implies for phi-2's 5.56 GB of weights;
- ``memo``: the same call once the memo holds the digest (what every later command pays);
- ``partial`` (v2): the header and the first and last MiB.

The peer is the partial fingerprint of the same file, measured in the same run. ``uptime`` is
printed beside the numbers: compare within a run on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from planner.files.fingerprint import Memo, content_fingerprint, file_digest, partial_fingerprint

PHI2_BYTES = 2_779_683_840 * 2  # phi-2's parameters at fp16


def phi2_blocks(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for b in range(n):
        p = f"model.layers.{b}."
        for name, shape in (("self_attn.q_proj", (2560, 2560)), ("self_attn.k_proj", (2560, 2560)),
                            ("self_attn.v_proj", (2560, 2560)), ("self_attn.dense", (2560, 2560)),
                            ("mlp.fc1", (10240, 2560)), ("mlp.fc2", (2560, 10240))):
            out[p + name + ".weight"] = torch.randn(shape, generator=g, dtype=torch.float32).half()
            out[p + name + ".bias"] = torch.zeros(shape[0], dtype=torch.float16)
    return out


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="fingerprint-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "model.safetensors"
    save_file(phi2_blocks(args.layers), str(path))
    size = path.stat().st_size
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    content = best_of(lambda: file_digest(path))
    memo = Memo(work / "memo")
    file_digest(path, memo)
    memo_s = best_of(lambda: content_fingerprint([path], work, memo), repeat=5)
    partial = best_of(lambda: partial_fingerprint([path], work), repeat=5)
    rate = size / content
    report = {"file_bytes": size, "layers": args.layers, "uptime": uptime, "content_s": round(content, 3),
              "content_gb_per_s": round(rate / 1e9, 3), "phi2_content_s": round(PHI2_BYTES / rate, 1),
              "memo_s": round(memo_s, 4), "partial_s": round(partial, 4),
              "content_over_partial": round(content / partial, 1)}
    print(json.dumps(report, indent=1))
    if args.json:
        from planner.files.atomic import atomic_write_bytes

        atomic_write_bytes(args.json, json.dumps(report, indent=1).encode())
    path.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
