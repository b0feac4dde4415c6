#!/usr/bin/env bash
# Run a command with DDS confined to loopback: inside a network namespace that has only `lo`
# (unshare -n, needs root or user namespaces) when possible, and always with the venv's
# loopback-only Fast DDS profile + ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST.
# Usage: scripts/run_isolated.sh <command> [args...]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export FASTRTPS_DEFAULT_PROFILES_FILE=${FASTRTPS_DEFAULT_PROFILES_FILE:-$ROOT/config/dds/fastdds_loopback.xml}
export FASTDDS_DEFAULT_PROFILES_FILE=${FASTDDS_DEFAULT_PROFILES_FILE:-$ROOT/config/dds/fastdds_loopback.xml}
if [ "${OPENVLA_NO_NETNS:-0}" != 1 ] && command -v unshare >/dev/null 2>&1 \
   && unshare -n true 2>/dev/null; then
  exec unshare -n -- bash -c 'ip link set lo up 2>/dev/null || ifconfig lo up 2>/dev/null; exec "$@"' _ "$@"
fi
echo "[run_isolated] no network namespace available: relying on the loopback-only DDS profile" >&2
exec "$@"
