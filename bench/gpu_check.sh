#!/usr/bin/env bash
# GPU check of the memory model (run on a machine with one CUDA GPU, from the repository root):
#   bash bench/gpu_check.sh            # about 5 minutes on an H200; prints one line per case
# Random weights of real shapes are built on the GPU (nothing is downloaded; bitsandbytes, optuna and
# gguf are not needed). For a phi-2-shaped and a Llama-3-8B-shaped model at 1k, 4k and 16k tokens
# (batch 1, NF4 everywhere, rank 16, SDPA), one warm-up step, then one measured step:
#   allocated: torch.cuda.max_memory_allocated vs the estimate's allocated bytes + the cuBLAS
#              workspace (it comes from the caching allocator): target within +-5%;
#   reserved:  torch.cuda.max_memory_reserved vs the plan's total less the CUDA context: target <=;
#   fragmentation: reserved / allocated - 1, the measurement behind RunSettings.reserve_fraction;
#   context:   device memory in use (mem_get_info) less reserved, the measurement behind
#              RunSettings.reserve_context_bytes.
# Env: GPU_CHECK_LAYERS=N builds N blocks instead of the real depth (faster, same per-block shapes).
#
# Part "plan" (issue 14): plans and materializes a phi-2-shaped random bf16 checkpoint with
# --score-device cuda (bench.scale: seq 256, 8 calibration and 2 proxy sequences, 4 trials, one
# fine-tune proxy candidate) and prints stage times, peak host memory, the planner's own
# max_memory_reserved and the budget it planned for (the invariant: reserved <= budget).
# It needs optuna and the SmolLM2 tokenizer there: run `bash bench/gpu_prepare.sh` here first and
# carry [".whl", ".gpu"]. GPU_CHECK_PART=memory|plan|all (default all) picks the parts.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PART=${GPU_CHECK_PART:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [ "$PART" != plan ]; then
timeout 470 python - <<'PY'
import gc, os, time
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PhiConfig

from planner.memory import estimate
from planner.overheads import CUBLAS_WORKSPACE_BYTES, reserve_breakdown
from planner.runtime.layers import add_lora, configure_run, quantize_model
from planner.settings import LayerChoice, RunSettings
from search_spaces.discovery import facts_from_config, find_targets

assert torch.cuda.is_available(), "gpu_check needs a CUDA GPU"
dev = torch.device("cuda")
depth = int(os.environ.get("GPU_CHECK_LAYERS", "0")) or None
SHAPES = {
    "phi-2": PhiConfig(hidden_size=2560, intermediate_size=10240, num_hidden_layers=depth or 32, num_attention_heads=32,
                       vocab_size=51200, partial_rotary_factor=0.4, max_position_embeddings=16384, resid_pdrop=0.0),
    "llama-3-8b": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=depth or 32,
                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                              max_position_embeddings=16384, rope_theta=500000.0),
}
CASES = [(1024, False), (1024, True), (4096, True), (16384, True)]
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, load {os.getloadavg()[0]:.2f}")
print(f"{'model':11} {'seq':>6} {'ckpt':>5} {'alloc pred':>11} {'alloc meas':>11} {'ratio':>6} "
      f"{'resv meas':>10} {'total-ctx':>10} {'<=':>3} {'frag':>6} {'context':>8} {'s':>5}")
G = 2**30
for name, cfg in SHAPES.items():
    t0 = time.time()
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    facts, targets = facts_from_config(model.config), find_targets(model)
    weights = {t.name + ".weight" for t in targets}
    non_target = sum(p.numel() for n, p in model.named_parameters() if n not in weights)
    choices = {t.name: LayerChoice(4, 16) for t in targets}
    quantize_model(model, choices, compute_dtype=torch.bfloat16)
    pm = add_lora(model, {n: 16 for n in choices}, adapter_dtype=torch.bfloat16)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    gc.collect(); torch.cuda.empty_cache()
    print(f"# {name}: built and quantized in {time.time() - t0:.0f} s", flush=True)
    for seq, ckpt in CASES:
        t1 = time.time()
        run = RunSettings(seq_len=seq, batch_size=1, gradient_checkpointing=ckpt, compute_dtype="bf16")
        est = estimate(facts, targets, choices, run, non_target)
        free, _ = torch.cuda.mem_get_info()
        if est.allocated_bytes > 0.9 * (free + torch.cuda.memory_reserved()):
            print(f"{name:11} {seq:6} {ckpt!s:>5} predicted {est.allocated_bytes / G:.1f} GiB: does not fit, skipped")
            continue
        configure_run(pm, run)
        pm.train()
        ids = torch.randint(0, cfg.vocab_size, (1, seq), device=dev)
        def step():
            loss = pm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()  # warm-up: optimizer states, cuBLAS workspace, kernels
        torch.cuda.synchronize(); gc.collect(); torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        alloc, resv = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        free1, total = torch.cuda.mem_get_info()
        context = total - free1 - torch.cuda.memory_reserved()
        pred = est.allocated_bytes + CUBLAS_WORKSPACE_BYTES
        bound = est.total_bytes - reserve_breakdown(est.allocated_bytes, run)["cuda_context"]
        print(f"{name:11} {seq:6} {ckpt!s:>5} {pred / G:10.2f}G {alloc / G:10.2f}G {alloc / pred:6.3f} "
              f"{resv / G:9.2f}G {bound / G:9.2f}G {'yes' if resv <= bound else 'NO':>3} {resv / alloc - 1:6.3f} "
              f"{context / 2**20:7.0f}M {time.time() - t1:5.1f}", flush=True)
        del ids
    del pm, model, opt, params
    gc.collect(); torch.cuda.empty_cache()
PY
fi
if [ "$PART" != memory ]; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
  export SCALE_TOKENIZER_DIR=$PWD/.gpu/tokenizer LOFTQ_PLANNER_CACHE=/tmp/gpu-check-cache
  timeout 420 python3 -m bench.scale --work /tmp/scale-gpu --models phi-2 --keep --extra "--score-device cuda --proxy-top 1" \
    --json /tmp/scale-gpu/phi2.json || echo "bench.scale exited with $?"
  python3 - <<'PY'
import glob, json
for path in sorted(glob.glob("/tmp/scale-gpu/runs/*/plan.json")):
    plan = json.load(open(path))
    mem = plan["search"].get("extra", {}).get("planner_memory", {})
    resv, budget = mem.get("gpu_peak_reserved_bytes"), plan["budget_bytes"]
    print(f"{path}: budget {budget / 2**30:.2f} GiB, planner max_memory_reserved "
          f"{(resv or 0) / 2**30:.2f} GiB ({'within' if resv is not None and resv <= budget else 'NOT within'} the budget), "
          f"host VmHWM {mem.get('host_peak_bytes', 0) / 2**30:.2f} GiB, timings {plan['search']['timings']}")
PY
fi
