# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# On a GPU machine: `make TANDEM_EXTRAS=gpu ...` (or any command once nvidia-smi sees a GPU: setup_env.sh
# adds the `gpu` extra itself).
VENV := .venv
RL := $(VENV)/bin/rl
PY := $(VENV)/bin/python

.PHONY: venv demo report screenshot test test-fast lint clean-demo

venv:
	@bash scripts/setup_env.sh

# torch's OpenMP threads wait for each other at every op. On 2 busy cores (other processes running) the
# tiny demo's steps take 3-6x longer with a thread per core than with one; on free cores a thread per core
# is faster (pretrain steps ~2x). So the demo runs on one thread when the 1-minute load average is already
# at least half the cores, unless OMP_NUM_THREADS is set.
ifeq ($(origin OMP_NUM_THREADS),undefined)
ifeq ($(shell awk -v n="$$(nproc)" '{ print ($$1 >= n / 2) }' /proc/loadavg 2>/dev/null),1)
demo: export OMP_NUM_THREADS := 1
endif
endif

# The whole recipe on the embedded arithmetic task, from one config: pretrain -> sft -> dpo -> grpo ->
# distill -> quantize, then runs/pipeline_tiny/report.md, report.html and curves.png. Run again, it skips
# the finished stages and resumes the interrupted one from its newest checkpoint.
demo: venv
	@[ -z "$$OMP_NUM_THREADS" ] || echo "OMP_NUM_THREADS=$$OMP_NUM_THREADS"
	$(RL) pipeline configs/pipeline_tiny.yaml $(ARGS)

report: venv
	$(RL) report runs/pipeline_tiny

# A headless-Chromium screenshot of the demo's report.html (installs Debian's chromium if absent).
screenshot:
	bash scripts/screenshot_report.sh runs/pipeline_tiny

# Two pytest-xdist workers, each taking whole test files (module fixtures are built once): the Ray,
# multi-process and engine tests spend much of their time waiting (process and actor starts, deadlines),
# which the other worker fills. Each worker computes on one thread (tests/conftest.py). TEST_JOBS=0: one
# process.
TEST_JOBS ?= 2
XDIST := $(if $(filter-out 0,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile)

test: venv
	$(PY) -m pytest -q tests $(XDIST) $(ARGS)

# Everything but the multi-process, Ray, engine and end-to-end tests (marked slow): run after every change.
test-fast: venv
	$(PY) -m pytest -q tests -m "not slow" $(XDIST) $(ARGS)

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf runs/pipeline_tiny
