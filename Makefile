# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV := .venv
RL := $(VENV)/bin/rl
PY := $(VENV)/bin/python

.PHONY: venv demo pretrain-demo grpo-demo test test-fast lint clean-demo

venv:
	@bash scripts/setup_env.sh

# The pretrain-then-align pipeline on the embedded tiny default: pretrain, then GRPO from its step-400
# checkpoint. Each step resumes if its run directory already holds checkpoints.
demo: pretrain-demo grpo-demo

pretrain-demo: venv
	$(RL) pretrain configs/pretrain_tiny.yaml $(ARGS)

grpo-demo: venv
	$(RL) grpo configs/grpo_tiny.yaml

test: venv
	$(PY) -m pytest -q tests $(ARGS)

# Everything but the multi-process, Ray, engine and end-to-end tests (marked slow): run after every change.
test-fast: venv
	$(PY) -m pytest -q tests -m "not slow" $(ARGS)

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf runs/pretrain_tiny runs/grpo_tiny
