# Two commands for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Scaling out (README): RFP_POSTGRES_URL=postgresql+psycopg2://user:pw@host:port/db moves the Dagster instance
# (runs, event logs, schedules) onto PostgreSQL; RFP_MLFLOW_BACKEND_URI=postgresql+psycopg2://.../db is the store of
# `make mlflow-server`, and training then logs to that server. Unset: sqlite files, as before.
# SQLAlchemy 2.1 reads a plain postgresql:// as psycopg 3, which dagster-postgres cannot use: name the driver
$(foreach v,RFP_POSTGRES_URL RFP_MLFLOW_BACKEND_URI,$(if $(filter postgresql://% postgres://%,$($(v))),\
  $(error $(v) must name the driver: postgresql+psycopg2://user:pw@host:port/db, not $($(v)))))
ifneq ($(strip $(RFP_POSTGRES_URL)),)
export DAGSTER_HOME := $(CURDIR)/dagster_home_pg
else
export DAGSTER_HOME := $(CURDIR)/dagster_home
endif
export RFP_HOME ?= $(CURDIR)/.rfp_home
MLFLOW_PORT ?= 5001
# `make mlflow-ui` serves here, and the run links written into Dagster's metadata point here
# (they are stored when a stage materialises: set the port before `make demo`, not after)
MLFLOW_UI_PORT ?= 5000
ifneq ($(strip $(RFP_MLFLOW_BACKEND_URI)),)
export MLFLOW_TRACKING_URI ?= http://127.0.0.1:$(MLFLOW_PORT)
export MLFLOW_UI_URL ?= http://127.0.0.1:$(MLFLOW_PORT)
endif
export MLFLOW_TRACKING_URI ?= sqlite:///$(RFP_HOME)/mlflow.db
export MLFLOW_UI_URL ?= http://127.0.0.1:$(MLFLOW_UI_PORT)
# no telemetry, no hub downloads: everything runs offline
export DAGSTER_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: setup lint test test-slow test-scale test-ui ui-browser demo dev mlflow-ui mlflow-server bench validate clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,system-metrics]'
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check rfp_core rfp_pipeline tests
	$(BIN)/ruff format --check rfp_core rfp_pipeline tests

test: $(STAMP)
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

# Dagster and MLflow on a private PostgreSQL server (installs PostgreSQL with apt-get when missing)
test-scale: $(STAMP)
	$(BIN)/pytest -q -m scale tests/test_scale.py

# headless Chromium + its driver from the OS packages (Debian/Ubuntu: apt-get, as root or with sudo) and Selenium
ui-browser: $(STAMP)
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update && $$SUDO apt-get install -y chromium chromium-driver; }
	$(BIN)/pip install --quiet -e '.[test,system-metrics,ui-test]'

# the UIs looked at: a tiny demo state, dagster-webserver + mlflow ui on free ports, screenshots into docs/ui/
test-ui: ui-browser
	RFP_SCREENSHOTS_DIR=$(CURDIR)/docs/ui $(BIN)/pytest -q -m slow tests/test_ui_screens.py

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
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port $(MLFLOW_UI_PORT)

# MLflow tracking server on $(RFP_MLFLOW_BACKEND_URI); artifacts go through it into $(RFP_HOME)/mlartifacts
mlflow-server: $(STAMP)
	@test -n "$(RFP_MLFLOW_BACKEND_URI)" || { echo "set RFP_MLFLOW_BACKEND_URI=postgresql+psycopg2://user:pw@host:port/db (the server's store)"; exit 1; }
	$(BIN)/mlflow server --backend-store-uri '$(RFP_MLFLOW_BACKEND_URI)' --artifacts-destination $(RFP_HOME)/mlartifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT)

validate: $(STAMP)
	$(BIN)/dagster definitions validate -w workspace.yaml

bench: $(STAMP)
	$(BIN)/rfp bench ingest && $(BIN)/rfp bench train && $(BIN)/rfp bench pairing

clean:
	rm -rf $(VENV) .rfp_home
