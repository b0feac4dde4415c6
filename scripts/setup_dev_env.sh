#!/usr/bin/env bash
# One command, no hand steps: creates/updates .venv (Python 3.12) with ROS 2 Jazzy (PyPI
# wheels), torch, ttnn, builds msg/ into the venv, installs this project editable, and makes
# every Python process of the venv DDS-loopback-safe by default.
# Re-running is fast: each step is skipped when its inputs did not change.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${OPENVLA_VENV:-$ROOT/.venv}
STAMPS=$VENV/.openvla_stamps
log() { printf '[setup] %s\n' "$*" >&2; }

find_python312() {
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys; assert sys.version_info[:2]==(3,12)' 2>/dev/null; then
    command -v python3.12; return
  fi
  local root
  if command -v pyenv >/dev/null 2>&1; then root=$(pyenv root); else root=${PYENV_ROOT:-$HOME/.pyenv}; fi
  local c
  for c in "$root"/versions/3.12*/bin/python3.12; do
    [ -x "$c" ] && { echo "$c"; return; }
  done
  return 1
}

stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; printf '%s' "$2" >"$STAMPS/$1"; }
hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

# 1. venv
if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python312) || { echo "error: Python 3.12 not found (looked on PATH and under pyenv). Install it, e.g. 'pyenv install 3.12'." >&2; exit 1; }
  log "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')

# 2. packages (one pip call, the resolver sees everything)
REQ_HASH=$(hash_of "$ROOT/requirements/dev.txt" "$ROOT/requirements/constraints.txt")
if ! stamp_ok pip "$REQ_HASH"; then
  log "installing requirements/dev.txt (first time: several minutes, ~8 GB)"
  # (this machine's pip config names local index folders that may not exist: drop that noise)
  pip_quiet() { local rc=0; "$VPY" -m pip "$@" >"$VENV/pip_install.log" 2>&1 || rc=$?
                grep -v 'is ignored: it is neither' "$VENV/pip_install.log" >&2 || true; return $rc; }
  pip_quiet install -q --upgrade pip
  pip_quiet install -q -r "$ROOT/requirements/dev.txt" -c "$ROOT/requirements/constraints.txt"
  "$VPY" -m pip check >/dev/null || { "$VPY" -m pip check >&2; echo "error: pip install left broken requirements" >&2; exit 1; }
  rm -f "$STAMPS/cmake_fix" "$STAMPS/msgs"
  stamp_set pip "$REQ_HASH"
fi

# 3. DDS loopback safety for every process of this venv (before anything ROS runs).
#    The profile lives in config/dds/; a .pth sets the variables unless the caller did.
PROFILE=$ROOT/config/dds/fastdds_loopback.xml
cat >"$SITE/openvla_ros_loopback_dds.pth" <<PTH
import os; [os.environ.setdefault(k, v) for k, v in (("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST"), ("FASTRTPS_DEFAULT_PROFILES_FILE", "$PROFILE"), ("FASTDDS_DEFAULT_PROFILES_FILE", "$PROFILE"), ("AMENT_PREFIX_PATH", "$VENV"))]
PTH

# 4. The ROS wheels export CMake targets naming the wheel builder's Python/numpy include dirs.
PYINC=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NPINC=$("$VPY" -c 'import numpy; print(numpy.get_include())')
if ! stamp_ok cmake_fix "$PYINC|$NPINC"; then
  log "rewriting include paths in the ROS wheels' CMake exports"
  { grep -rlE '/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+|site-packages/numpy/_core/include' \
    "$VENV/share" --include='*.cmake' 2>/dev/null || true; } | while read -r f; do
      sed -i -E -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#$PYINC#g" \
                -e "s#[^;\"]*/site-packages/numpy/_core/include#$NPINC#g" "$f"
    done
  stamp_set cmake_fix "$PYINC|$NPINC"
fi

# 5. Messages: build msg/ with ament_cmake and install into the venv (the Python modules stay
#    editable in the source tree; only openvla_ros/__init__.py and the generated msg go there).
MSG_HASH=$(hash_of "$ROOT/CMakeLists.txt" "$ROOT/package.xml" "$ROOT"/msg/*.msg "$ROOT/openvla_ros/__init__.py")
if ! stamp_ok msgs "$MSG_HASH" || [ ! -d "$SITE/openvla_ros/msg" ]; then
  log "building msg/ into the venv"
  BUILD=$ROOT/build/dev_msgs MSGLOG=$ROOT/build/dev_msgs.log
  rm -rf "$BUILD"; mkdir -p "$BUILD"
  (
    export PATH=$VENV/bin:$PATH AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV
    cmake -S "$ROOT" -B "$BUILD" -DCMAKE_INSTALL_PREFIX="$VENV" -DPython3_EXECUTABLE="$VPY" \
      -DOPENVLA_ROS_INSTALL_PYTHON_MODULES=OFF -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release >"$MSGLOG" 2>&1 \
      && cmake --build "$BUILD" -j"$(nproc)" >>"$MSGLOG" 2>&1 \
      && cmake --install "$BUILD" >>"$MSGLOG" 2>&1
  ) || { echo "error: message build failed; see $MSGLOG" >&2; tail -30 "$MSGLOG" >&2; exit 1; }
  stamp_set msgs "$MSG_HASH"
fi
# The installed openvla_ros/ holds the generated msg; point it at the source modules too
# (pkgutil.extend_path reads <name>.pkg files on sys.path).
echo "$ROOT/openvla_ros" >"$SITE/openvla_ros.pkg"

# 6. This project, editable, with its console scripts.
PROJ_HASH=$(hash_of "$ROOT/setup.py")
mkdir -p "$ROOT/build"
if ! stamp_ok project "$PROJ_HASH"; then
  log "installing the project (editable)"
  "$VPY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >"$ROOT/build/pip_editable.log" 2>&1 \
    || { cat "$ROOT/build/pip_editable.log" >&2; exit 1; }
  stamp_set project "$PROJ_HASH"
fi

log "ready: $VENV ($("$VPY" -c 'import sys; print(sys.version.split()[0])'))"
