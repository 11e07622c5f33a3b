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

# Two pytest processes side by side on the machine's cores: SIDE_TESTS beside the rest. The cluster tests wait on Ray
# nodes and jobs half their time, and the benchmark and exit-status tests start their own Ray and interpreters; the rest
# shares one Ray, one corpus and one set of trained weights, made once. The side's output is printed when both are
# done. `make test PYTEST_ARGS=...` runs one pytest with those arguments instead. --durations: the slowest tests in
# every CI log, to keep the run inside its budget.
SIDE_TESTS := tests/test_job_submit.py tests/test_benchmark.py tests/test_exit_status.py
PYTEST := $(BIN)/python -m pytest -q

test: lint
ifeq ($(strip $(PYTEST_ARGS)),)
	@$(PYTEST) -p no:cacheprovider --durations=8 $(SIDE_TESTS) > .side-tests.log 2>&1 & side=$$!; \
	$(PYTEST) --durations=15 $(addprefix --ignore=,$(SIDE_TESTS)); rest=$$?; \
	wait $$side; beside=$$?; \
	echo "=== beside the rest: $(SIDE_TESTS) ==="; cat .side-tests.log; \
	test $$rest = 0 && test $$beside = 0
else
	$(PYTEST) --durations=15 $(PYTEST_ARGS)
endif

demo: $(STAMP)
	$(BIN)/python jobs/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .side-tests.log
