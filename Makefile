# Two commands for a newcomer:  make demo   and   make test
.PHONY: setup demo test bench clean-venv

VENV ?= .venv
PY := $(VENV)/bin/python
TINY := build/tiny_openvla

setup:
	@bash scripts/setup_dev_env.sh

$(TINY)/config.json: | setup
	@$(VENV)/bin/openvla-tiny-checkpoint $(TINY) >/dev/null

demo: setup $(TINY)/config.json
	@bash scripts/run_isolated.sh bash scripts/demo.sh $(TINY)

test: setup
	@bash scripts/run_isolated.sh $(PY) -m pytest -q test $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV) build
