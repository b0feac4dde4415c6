#!/usr/bin/env bash
# The README's demo (`make demo`, run under scripts/run_isolated.sh): the real ROS 2 node
# pipeline on the embedded tiny RANDOM checkpoint (its actions are meaningless), CPU:
# synthetic camera + instruction -> openvla_node -> a few printed EndEffectorActions, then a
# clean SIGINT shutdown of both nodes. Same processes as launch/openvla_demo.launch.py, started
# directly (ros2 launch is not installable from PyPI).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WEIGHTS=${1:-$ROOT/build/tiny_openvla}
VENV=${OPENVLA_VENV:-$ROOT/.venv}
# A demo-private ROS domain unless the caller chose one.
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$((100 + $$ % 100))}
echo "== openvla_node on the tiny random checkpoint ($WEIGHTS): actions are MEANINGLESS =="
exec "$VENV/bin/python" -m openvla_ros.demo --weights "$WEIGHTS" --instruction "pick up the red cup" \
  --unnorm-key bridge_orig --device cpu --count 5
