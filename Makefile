# Two commands for a fresh machine: `make run` and `make test`. Both set up .venv/ first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ghostsys-installed
# uv reads no pip config: hand it the find-links folder pip is configured with (the local CPU torch).
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_FLAGS   := $(if $(FIND_LINKS),--find-links $(FIND_LINKS))

.PHONY: setup run test bench check profile analysis gpu-check clean

setup: $(STAMP)

# Re-installs only when the dependency list or the pins change; `make setup` is a no-op otherwise.
$(STAMP): pyproject.toml constraints.txt setup.py ghostsys/nn/csrc/ghost_cols.cpp
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip >/dev/null
	@$(BIN)/python -m pip install -q -c constraints.txt uv
	DS_BUILD_OPS=0 $(BIN)/uv pip install -q -p $(BIN)/python $(UV_FLAGS) -c constraints.txt -e '.[dev]'
	@# setup.py ships ghostsys-torchvision.pth (the torchvision import hook the accelerate CLI needs): check it took.
	@$(BIN)/python -c "from ghostsys._compat import import_hook_installed as ok; assert ok(), 'ghostsys-torchvision.pth is missing from site-packages'"
	@# The fused (M, C)/channels_last GhostNorm kernel, compiled once per machine (~20 s); without g++ the layer uses ATen.
	@$(BIN)/python -c "from ghostsys.nn.fused import build; print('fused GhostNorm kernel:', build())" \
		|| echo "warning: the fused GhostNorm kernel did not build (see above); GhostBatchNorm falls back to ATen kernels" >&2
	@touch $@

run: setup
	$(BIN)/python launch/run.py --mode accumulate --nfp 8

test: setup
	$(BIN)/python -m pytest -q -ra

bench: setup
	$(BIN)/python -m ghostsys.bench

check: setup
	$(BIN)/torchrun --nproc_per_node 2 launch/check.py

profile: setup
	$(BIN)/python launch/profile.py --modes unsynced,syncbn --world-sizes 1,2 --steps 12 --out runs/profile

# The short real CPU sweep behind the notebooks, then every notebook executed against it (8 min on a busy 2-core machine):
# executed notebooks in runs/analysis/notebooks/, figures (PNG + the rows behind each, CSV) in runs/analysis/figures/.
analysis: setup
	MPLBACKEND=Agg $(BIN)/python launch/analysis.py --out runs/analysis

# One GPU, under 8 minutes: layer benchmark, layer/accumulate profile at fp32 and bf16, checker on CUDA.
gpu-check: setup
	PYTHON=$(BIN)/python launch/gpu_check.sh runs/gpu-check

clean:
	rm -rf $(VENV) *.egg-info
