# The project's commands. Each target installs what it needs on a fresh Debian/Ubuntu machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CACHE := tests/.cache

.PHONY: test lint typecheck pytest demo zip bench docs sysdeps venv waagent vendor npm clean

test: venv waagent docs-check lint typecheck pytest

sysdeps:
	@PYTHON=$(PYTHON) sh build/sysdeps.sh

venv: $(STAMP)
$(STAMP): setup.cfg pyproject.toml | sysdeps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# The real WALinuxAgent code (Debian package `waagent`) for protocol conformance tests.
waagent: $(CACHE)/waagent/.done
$(CACHE)/waagent/.done: | sysdeps
	sh build/waagent.sh $(CACHE)/waagent
	@touch $@

lint: venv
	$(VENV)/bin/ruff check akvvm_ext handler tests build bench

typecheck: venv
	$(VENV)/bin/mypy

# Wheels the zip vendors, downloaded before the tests so no test waits on a registry.
vendor: venv
	$(PY) build/make_zip.py --download-only

# The independent fluentd implementation (@fluent-org/logger) for the forward-protocol cross-check.
npm: $(CACHE)/npm/node_modules/.package-lock.json
$(CACHE)/npm/node_modules/.package-lock.json: tests/fluent_cross/package.json tests/fluent_cross/package-lock.json | sysdeps
	@mkdir -p $(CACHE)/npm
	cp tests/fluent_cross/package.json tests/fluent_cross/package-lock.json $(CACHE)/npm/
	npm ci --prefix $(CACHE)/npm --no-audit --no-fund --loglevel=error

pytest: venv waagent vendor npm
	$(PY) -m pytest -q

docs: venv
	$(PY) -m akvvm_ext.settings_doc > docs/settings.md

docs-check: venv
	@$(PY) -m akvvm_ext.settings_doc | diff -u docs/settings.md - || \
	  (echo "docs/settings.md is stale: run 'make docs'" >&2; exit 1)

zip: venv
	$(PY) build/make_zip.py

demo: venv waagent zip
	$(PY) -m tests.demo

bench: venv
	$(PY) bench/run.py

clean:
	rm -rf dist build/vendor $(CACHE)
