# Everything runs from the virtualenv at .venv; `make install` builds it from nothing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test run bench screenshots clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first, pinned: the machine holds this CPU build on disk; a looser pin pulls CUDA.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -c requirements.lock -e '.[all,test]'
	# The package's own modules, compiled once. An editable install leaves them as source (pip
	# compiles only what it copies), and where PYTHONDONTWRITEBYTECODE is set, as on this project's
	# machines, every process compiled them again: some 50 ms of each run's start.
	$(PY) -m compileall -q firetitan_track runner
	touch $(STAMP)

# Two workers (one per core here; TEST_WORKERS=N for another machine): each file runs whole on one
# worker, with its own local service and MLflow server.
TEST_WORKERS ?= 2
test: install
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

# The main job: a small learning-rate sweep of the demo on the embedded local service,
# exported to MLflow, ending with the compare table and the command that opens the UI.
# Running it again finishes only unfinished trials.
run: install
	$(VENV)/bin/firetitan-track sweep examples/reverse_sft.toml --sweep-id demo-lr \
		--grid optim.learning_rate=1e-3,3e-3
	@$(VENV)/bin/firetitan-track local down >/dev/null  # the service this job started; the UI needs none

# The README's MLflow pictures (docs/img), taken in Chromium from the `make run` sweep itself.
screenshots: run
	$(PY) docs/screenshots.py

bench: install
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .firetitan .envs  # the tests' environments are kept in ~/.cache/firetitan-track/test-envs
