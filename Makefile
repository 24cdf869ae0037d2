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

.PHONY: install system-libs demo test lint format bench clean

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

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -c constraints.txt torch==2.13.0 numpy
	# DeepSpeed builds its ops lazily; it needs torch in the build environment.
	DS_BUILD_OPS=0 $(PIP) install -c constraints.txt --no-build-isolation deepspeed
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: system-libs $(STAMP)

demo: install
	$(BIN)/python -m avts_dist.demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python -m tests.benchmarks.run_all --out bench-results

clean:
	rm -rf $(VENV) runs mlruns demo bench-results .pytest_cache .ruff_cache
