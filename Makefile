# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV := .venv
RL := $(VENV)/bin/rl
PY := $(VENV)/bin/python

.PHONY: venv demo test lint clean-demo

venv:
	@bash scripts/setup_env.sh

demo: venv
	$(RL) pretrain configs/pretrain_tiny.yaml $(ARGS)

test: venv
	$(PY) -m pytest -q tests $(ARGS)

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf runs/pretrain_tiny
