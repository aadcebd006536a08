# sdserve: `make run` (install, start, generate one image, stop) and `make test`.
# Everything lives in .venv/ at the repo root.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# CPU machines pin torch to a CPU wheel; machines with an NVIDIA driver take pyproject's range.
CONSTRAINTS ?= $(if $(shell command -v nvidia-smi),,constraints-cpu.txt)
PROMPT ?= a red circle on a blue background
OUT    ?= out/sdserve.png
GRPC_PORT ?= 9000
REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: install redis run serve test chaos lint protos clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

install: $(BIN)/.installed  ## create .venv and install sdserve with its dev tools

$(BIN)/.installed: pyproject.toml constraints-cpu.txt
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "python venv support is missing; installing Debian's python3-venv"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	@touch $@

redis: install  ## start a local redis-server for the job queue if none answers at $(REDIS_URL)
	@BIN='$(BIN)' bash deploy/ensure-redis.sh '$(REDIS_URL)'

run: install redis  ## start the services, generate one image into $(OUT) (and one as a job), stop
	@PROMPT='$(PROMPT)' OUT='$(OUT)' GRPC_PORT='$(GRPC_PORT)' REDIS_URL='$(REDIS_URL)' BIN='$(BIN)' bash deploy/run-local.sh

serve: install redis  ## run `sdserve serve` in the foreground (Ctrl-C stops it)
	$(BIN)/sdserve serve --grpc-port $(GRPC_PORT) --redis-url '$(REDIS_URL)'

test: install  ## lint, check the layers, then run every test (starts its own Ray, Redis and Prometheus on free ports)
	@bash deploy/install-tools.sh redis-server prometheus chromium chromium-driver
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

chaos: install  ## the chaos test (3 minutes): SIGKILL stage replicas under load (SDSERVE_CHAOS_S=60 for a short one)
	@bash deploy/install-tools.sh redis-server
	$(BIN)/python -m pytest -m chaos tests/chaos -s

lint: install  ## ruff check, format check and the import contracts (.importlinter)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

protos: install  ## regenerate services/sdserve/v1 from protos/
	$(BIN)/python protos/generate.py

clean:  ## remove .venv and outputs
	rm -rf $(VENV) out .pytest_cache
