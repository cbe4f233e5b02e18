# tritonchat: the two commands a newcomer needs are `make run` and `make test`; both install what is missing first.
SHELL   := /bin/bash
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed
NGPUS   ?= $(shell nvidia-smi -L 2>/dev/null | wc -l)
ARGS    ?=

.PHONY: install jail run test lint bench speedrun chat serve clean help

help:
	@echo "make run       tiny speedrun on CPU: tokenizer -> base -> mid -> SFT -> RL -> evals -> report card"
	@echo "make test      lint, then the test suite (Triton kernels under the interpreter on CPU)"
	@echo "make lint      ruff over the whole repository (line length 120)"
	@echo "make bench     kernel benchmark suites (real numbers need a CUDA GPU; CPU runs a smoke version)"
	@echo "make speedrun  the d20 speedrun on every GPU with torchrun"
	@echo "make chat      chat with the newest checkpoint      make serve   web UI + OpenAI-compatible API"

install: $(STAMP) jail

# The python tool runs model-written code only inside bubblewrap. Root installs it; anyone else gets the command
# (never sudo): until then the tool refuses to run and says why.
jail:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q bubblewrap >/dev/null || { apt-get update -q && apt-get install -y -q bubblewrap >/dev/null; }; \
	  else echo "make: the python tool's jail needs bubblewrap; install it with: sudo apt-get install -y bubblewrap"; fi; }

# Idempotent: re-runs only when the packaging or the Rust crate changed. The venv sees system packages so a GPU
# machine's preinstalled CUDA torch/triton are used as they are; without CUDA we install the CPU torch wheel.
$(STAMP): pyproject.toml rustbpe/Cargo.toml $(wildcard rustbpe/src/*.rs) rustbpe/offline.sh
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch; \
	  else $(PIP) install -q --retries 0 --timeout 5 "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
	       || $(PIP) install -q "torch==2.13.0"; fi; fi
	@bash rustbpe/offline.sh
	$(PIP) install -q -e ".[dev]"
	@touch $@

run: install
	$(PY) -m train.speedrun --preset tiny $(ARGS)

lint: install
	$(PY) -m ruff check .

# pytest exits 5 when it collects nothing; that is not a failure of the code.
test: lint
	@$(PY) -m pytest tests $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: install
	$(PY) -m bench.kernels --suite all $(ARGS)

speedrun: install
	@if [ "$(NGPUS)" -lt 1 ]; then echo "make speedrun needs CUDA GPUs (found none); try 'make run' for the CPU tiny preset"; exit 1; fi
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NGPUS) -m train.speedrun -- --preset d20 $(ARGS)

chat: install
	$(PY) -m model.chat $(ARGS)

serve: install
	$(PY) -m model.server $(ARGS)

clean:
	rm -rf $(VENV) rustbpe/target .pytest_cache
