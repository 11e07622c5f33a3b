# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
# Ultralytics must never download weights, fonts or pip packages at run time: users give weight paths or URIs.
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := False

.PHONY: venv test lint demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

lint: $(STAMP)
	$(BIN)/ruff check .

# --durations: the slowest tests in every CI log, to keep the run inside its budget
test: lint
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
