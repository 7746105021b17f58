# The two commands: `make demo` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
TORCH_INDEX_URL ?=

.PHONY: demo test setup system-deps clean
# Debian packages that the status page's tests drive (a real browser and a real MQTT broker)
SYSTEM_DEPS := chromium fonts-liberation mosquitto

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run: make PYTHON=python3 ..."; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Without CUDA, install torch first from TORCH_INDEX_URL (e.g. PyTorch's CPU wheel index) or the
	# machine's configured index, so that the project's pin does not pull a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)); \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/swarmtrain demo

# As root with apt (CI), the missing ones are installed; elsewhere the tests that need them are skipped
# and say why in the summary.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		missing=$$(for p in $(SYSTEM_DEPS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
		if [ -n "$$missing" ]; then \
			echo "installing" $$missing; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		fi; \
	else \
		echo "not root with apt: tests that need $(SYSTEM_DEPS) run only where they are installed"; \
	fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q --durations=30 tests

clean:
	rm -rf $(VENV) build *.egg-info
