# Set-up and the two commands of the README: `make demo` (main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db

.PHONY: setup demo test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(PY) -m mexp.main --config configs/demo.yaml

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

clean:
	rm -rf mlruns mlflow.db .cache data/synthetic stage1_cnn_output stage2_lstm_output outputs
