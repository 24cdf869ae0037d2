# The two commands of the README: `make demo` and `make test`. Each does its own set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PIP := $(BIN)/pip -q --disable-pip-version-check
PYTEST_ARGS ?=

# torchcodec (data.video_decoder=torchcodec) loads FFmpeg's shared libraries at run time; PyAV
# and decord bring their own. Debian 12 ships FFmpeg 5; any FFmpeg 4-8 does (see README).
FFMPEG_LIBS := libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59 libavfilter8

.PHONY: install system-libs system-pkgs demo study test chaos lint format bench gpu-check gpu-wheels clean

system-libs:
	@if ldconfig -p | grep -Eq 'libavcodec\.so\.(58|59|60|61|62) '; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "apt-get install $(FFMPEG_LIBS)"; \
		apt-get install -y -q --no-install-recommends $(FFMPEG_LIBS) >/dev/null \
		|| { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(FFMPEG_LIBS) >/dev/null; } \
		|| echo "warning: could not install $(FFMPEG_LIBS); use data.video_decoder=pyav" >&2; \
	else \
		echo "warning: no FFmpeg shared libraries; install $(FFMPEG_LIBS) or use data.video_decoder=pyav" >&2; \
	fi

# What the tests start for real and Debian ships: the single-node SLURM cluster (slurm-wlm, munge;
# iproute2 for the network-namespace nodes) and the browser the HTML reports are checked in. Installed
# here, once, so that no test runs apt-get (launch/local_slurm.sh still installs slurm-wlm for a
# user who brings the cluster up without `make install`).
SYSTEM_PKGS := slurm-wlm munge iproute2 chromium
system-pkgs:
	@missing=""; for p in $(SYSTEM_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "apt-get install$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends $$missing >/dev/null \
		|| { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null; } \
		|| echo "warning: could not install$$missing; the tests that need them will skip" >&2; \
	else \
		echo "warning: missing$$missing (needs root); the tests that need them will skip" >&2; \
	fi

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -c constraints.txt torch==2.13.0 numpy
	# DeepSpeed builds its ops lazily; it needs torch in the build environment.
	DS_BUILD_OPS=0 $(PIP) install -c constraints.txt --no-build-isolation deepspeed
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: system-libs system-pkgs $(STAMP)

demo: install
	$(BIN)/python -m avts_dist.demo

# The whole study of docs/results.md on the local SLURM cluster (brought up when it is not), then
# its tables, plot and intervals. Hours on 2 CPUs (docs/results.md 1.8); a re-run reuses every
# finished pretraining and evaluation.
STUDY ?= main
study: install
	$(BIN)/avts launch cluster status >/dev/null 2>&1 || $(BIN)/avts launch cluster up
	@# The tables are written even when some element failed (its cells print "not run"); the
	@# study's exit status is make's.
	$(BIN)/avts study --config configs/study/$(STUDY).yaml --cluster local; status=$$?; \
	$(BIN)/avts compare --study $(STUDY) --out runs/study_$(STUDY) && exit $$status

# The SLURM tests and the rest, side by side in two pytest processes (tests/run_suite.py; one
# serial pytest with AVTS_TEST_SERIAL=1). --durations keeps the slowest tests in view on every
# run (docs: issue #21's budget, README).
test: install
	$(BIN)/python -m tests.run_suite $(PYTEST_ARGS)

# The chaos run (tests/chaos, docs/training.md): kills, S3 faults and a tracking outage.
chaos: install
	$(BIN)/python -m pytest tests/chaos -m chaos $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python -m tests.benchmarks.run_all --out bench-results

# The GPU path measured on one GPU (tests/gpu/gpu_check.py, <= 8 min): throughput and MFU of the
# three video nets, bf16-vs-fp32 conv3d agreement, the real trainer on NCCL. It runs with the GPU
# machine's own torch (the venv holds the CPU wheel) plus the wheels of `make gpu-wheels`. Without
# a GPU it measures nothing, says so and exits 3.
GPU_PYTHON ?= $(firstword $(wildcard /opt/torch/.venv/bin/python3 $(BIN)/python) python3)
gpu-check:
	@PYTHONPATH=$(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH)) $(GPU_PYTHON) -m tests.gpu.gpu_check --out bench-results/gpu-check.json

# Wheels a GPU image with torch but without this project's other packages needs (Python 3.12,
# x86_64), into .whl/ (git-ignored; carry it). Versions: the ones this venv runs. deepspeed has no
# wheel on PyPI: built here (pure Python with DS_BUILD_OPS=0). On the GPU machine:
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
GPU_WHEELS := torchdata decord av omegaconf pydantic pydantic_core annotated-types \
	typing-inspection hjson
gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	$(BIN)/pip freeze | grep -i -E "^($(shell echo $(GPU_WHEELS) | tr ' ' '|'))==" > .whl/requirements.txt
	$(PIP) download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 -d .whl -r .whl/requirements.txt
	DS_BUILD_OPS=0 $(PIP) wheel --no-deps --no-build-isolation -w .whl \
		deepspeed==$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('deepspeed'))")
	du -sh .whl

clean:
	rm -rf $(VENV) runs mlruns demo bench-results .pytest_cache .ruff_cache .whl
