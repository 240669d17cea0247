# Two commands for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME := $(CURDIR)/dagster_home
export RFP_HOME ?= $(CURDIR)/.rfp_home
export MLFLOW_TRACKING_URI ?= sqlite:///$(RFP_HOME)/mlflow.db
# no telemetry, no hub downloads: everything runs offline
export DAGSTER_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: setup test test-slow demo dev mlflow-ui bench validate clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

demo: $(STAMP)
	$(BIN)/python -m rfp_pipeline.demo

dev: $(STAMP)
	$(BIN)/dagster dev -w workspace.yaml

# the demo's evaluated model over HTTP: POST JSON to http://127.0.0.1:$(PORT)/invocations
.PHONY: serve
MODEL ?= models:/demo@champion
PORT ?= 5001
serve: $(STAMP)
	$(BIN)/rfp serve --model $(MODEL) --port $(PORT)

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI)

validate: $(STAMP)
	$(BIN)/dagster definitions validate -w workspace.yaml

bench: $(STAMP)
	$(BIN)/rfp bench ingest && $(BIN)/rfp bench train && $(BIN)/rfp bench pairing

clean:
	rm -rf $(VENV) .rfp_home
