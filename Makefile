# Two commands for a newcomer:  make demo   and   make test
# On a robot with apt ROS 2 (after `source /opt/ros/jazzy/setup.bash`):  make setup ROS=system
.PHONY: setup demo test bench clean-venv

VENV ?= .venv
ROS ?= pypi
PY := $(VENV)/bin/python
TINY := build/tiny_openvla

setup:
	@OPENVLA_VENV=$(VENV) bash scripts/setup_dev_env.sh --ros=$(ROS)

$(TINY)/config.json: | setup
	@$(VENV)/bin/openvla-tiny-checkpoint $(TINY) >/dev/null

demo: setup $(TINY)/config.json
	@bash scripts/run_isolated.sh bash scripts/demo.sh $(TINY)

test: setup
	@bash scripts/run_isolated.sh $(PY) -m pytest -q test $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV) build
