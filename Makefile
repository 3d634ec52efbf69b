# The two set-up commands of the README. Both install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install quickstart test bench gpu-check

# torch/torchvision first and pinned: on the CI and dev machines they install from the
# local wheel cache; everything else comes from PyPI.
.install-stamp: pyproject.toml
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[test]"
	touch $@

install: .install-stamp

quickstart: install
	@test -f data/quickstart_tokens/index.json || $(PYTHON) -m distreg.cli data synth-tokens data/quickstart_tokens
	@# Each invocation is a new run (a used run_dir is refused unless --resume).
	$(PYTHON) -m distreg.cli train configs/quickstart.yaml --set run_dir=runs/quickstart/$$(date +%Y%m%d-%H%M%S)

test: install
	DS_ACCELERATOR=cpu $(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) benchmarks/overhead.py

# On one NVIDIA GPU (< 8 min): CUDA-marked tests + throughput table. Without a GPU:
# `benchmarks/gpu_check.sh --cpu-dry-run` exercises it on the CPU.
gpu-check: install
	benchmarks/gpu_check.sh
