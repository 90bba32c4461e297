"""Builds: what turns a plan into files a user runs.

- :mod:`~planner.build.materialize`: LoftQ per layer -> the packed folder (backbone + PEFT adapter);
- :mod:`~planner.build.hf_bnb`: the stock transformers bitsandbytes-NF4 checkpoint of an all-NF4 plan;
- :mod:`~planner.build.gguf_export`: llama.cpp's ``model.gguf`` + ``adapter.gguf``;
- :mod:`~planner.build.adapter`: ``finetune``'s trained-adapter folder;
- :mod:`~planner.build.manual`: plans with hand-picked per-layer choices (tests, benches, baselines).

This package sits beside :mod:`planner.search` and above :mod:`planner.runtime` and
:mod:`planner.sources` (README, "Code map").
"""
