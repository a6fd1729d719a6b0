# The project's commands. Each target installs what it needs on a fresh Debian/Ubuntu machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSDEPS := libacl1-dev acl openssl nginx-light gcc
CACHE := tests/.cache

.PHONY: test lint typecheck pytest demo zip bench docs sysdeps venv waagent clean

test: venv waagent docs-check lint typecheck pytest

sysdeps:
	@missing=""; for p in $(SYSDEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:$$missing"; \
	    (apt-get install -y -qq $$missing >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq $$missing)) ; \
	  else echo "missing system packages; run: sudo apt-get install -y$$missing" >&2; exit 1; fi; \
	fi

venv: $(STAMP)
$(STAMP): setup.cfg pyproject.toml | sysdeps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# The real WALinuxAgent code (Debian package `waagent`) for protocol conformance tests.
waagent: $(CACHE)/waagent/.done
$(CACHE)/waagent/.done: | sysdeps
	@mkdir -p $(CACHE)/waagent
	cd $(CACHE) && (ls waagent_*.deb >/dev/null 2>&1 || apt-get download waagent 2>/dev/null || (apt-get update -qq && apt-get download waagent))
	dpkg-deb -x $$(ls $(CACHE)/waagent_*.deb | head -1) $(CACHE)/waagent/root
	@touch $@

lint: venv
	$(VENV)/bin/ruff check akvvm_ext handler tests build bench

typecheck: venv
	$(VENV)/bin/mypy

pytest: venv waagent
	$(PY) -m pytest -q

docs: venv
	$(PY) -m akvvm_ext.settings_doc > docs/settings.md

docs-check: venv
	@$(PY) -m akvvm_ext.settings_doc | diff -u docs/settings.md - || \
	  (echo "docs/settings.md is stale: run 'make docs'" >&2; exit 1)

zip: venv
	$(PY) build/make_zip.py

demo: venv zip
	$(PY) -m tests.demo

bench: venv
	$(PY) bench/run.py

clean:
	rm -rf dist build/vendor $(CACHE)
