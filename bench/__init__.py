"""Benchmarks (not part of the test run); each runs as ``python -m bench.NAME`` and prints a ratio
against a peer measured in the same run. Results live in bench/results/.

common       settings, the byte counter, the baselines (uniform, first-k) and the SmolLM2 set-up
evaluation   the two evaluation texts (pydoc test split, bench/texts/ out of domain), PPL + KL row fields
quality      SmolLM2: planned vs uniform / first-k / QLoRA at equal memory, perplexity after fine-tuning
correlation  SmolLM2: do the short fine-tune proxy and zero-step KL rank plans like a longer fine-tune?
embedding    MiniLM-L6: embedding cosine of planned vs uniform models at equal memory (serving)
search       the exact solver vs scipy milp (phi-2-sized workload); guided search vs the exact plan
loftq_speed  residual-table speed vs PEFT's loftq_init
loftq_report LoftQ residual per iteration; the 8-bit formats' rate-distortion
scale        planning at scale: memory and time of plan + materialize on random checkpoints of real shapes
llamacpp     SmolLM2 GGUF export run by llama.cpp itself: perplexity vs planner.load (issue 18's 1%), vs llama.cpp's quantizer
synthetic    (no script) random bf16 checkpoints of real shapes, written shard by shard, for scale

May import ``planner``, ``loftq``, ``search_spaces`` and ``tests`` (the PEFT reference); nothing
imports ``bench``.
"""
