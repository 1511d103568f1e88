# Stride: the two commands (demo, test) plus setup and benchmarks. Each sets up what it needs.
PY := .venv/bin/python
# One intra-op thread: the demo's and the tests' tensors are small, and on 2 cores shared by the test
# process, a ComfyUI server and a browser, OpenMP spin-waiting made two threads up to 20x slower.
export OMP_NUM_THREADS ?= 1
WORKFLOW ?= workflows/stride_demo.json
OUT ?= demo_out

.PHONY: setup demo test lint bench bench-quick bench-gpu bench-full-size test-newest-host
setup:
	bash scripts/provision.sh

demo: setup
	$(PY) scripts/run_workflow.py $(WORKFLOW) --out $(OUT)

test: setup lint
	bash scripts/provision.sh --browser
	$(PY) -m pytest -q -ra tests

# ruff (lint, whole repository) and mypy (types, distill_core and nodes); settings in pyproject.toml.
# Both run, so that one call shows all findings; it fails if either finds something.
lint: setup
	$(PY) -m ruff check .; ruff=$$?; $(PY) -m mypy && exit $$ruff

bench: setup
	$(PY) -m bench.run

bench-quick: setup
	$(PY) -m bench.run --quick

bench-gpu: setup
	$(PY) -m bench.run --gpu

# Full-size SD1.5/SDXL rows on this machine's device (not in CI; see bench/full_size.py for the run time).
bench-full-size: setup
	$(PY) -m bench.run --only full_size

# The host-facing tests against another ComfyUI work tree (e.g. the newest) in an environment layered on .venv
# (.cache/newest-host-venv). CI (.ci/run) runs it on ComfyUI 0.33.0 after `test`. See scripts/test_newest_host.sh.
test-newest-host: setup
	@test -n "$(COMFYUI_NEWEST)" || { echo "usage: make test-newest-host COMFYUI_NEWEST=/path/to/ComfyUI"; exit 2; }
	bash scripts/test_newest_host.sh $(COMFYUI_NEWEST)
