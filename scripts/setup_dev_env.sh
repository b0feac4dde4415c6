#!/usr/bin/env bash
# One command, no hand steps. Two ways to get ROS 2 (never both: two rclpy builds in one process break):
#
#   --ros=pypi   (default; `make setup`)   this dev / CI machine: creates/updates .venv (Python 3.12) with
#                ROS 2 Jazzy from PyPI wheels, torch, ttnn, builds msg/ into the venv, installs this
#                project editable, and makes every Python process of the venv DDS-loopback-safe.
#   --ros=system (`make setup ROS=system`) a robot with apt ROS 2 (Jazzy / Humble): run it AFTER
#                `source /opt/ros/<distro>/setup.bash`; creates a venv with --system-site-packages
#                (rclpy and the messages come from the distro) holding only the model stack
#                (requirements/robot.txt: torch, transformers, timm, ttnn, ...), numpy kept at the
#                distro's major version. The package itself is then built by colcon (docs/ros_node.md,
#                "Robot install").
#
# The mode is checked against the shell: a sourced ROS (ROS_DISTRO, a distro prefix with rclpy in
# AMENT_PREFIX_PATH) with --ros=pypi, or an existing venv of the other kind, is refused with the fix.
# --plan prints the decisions (mode, interpreter, venv, requirements, checks) and changes nothing.
# Env: OPENVLA_VENV (default <repo>/.venv), OPENVLA_ROS (pypi | system; --ros wins).
# Re-running is fast: each step is skipped when its inputs did not change.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${OPENVLA_VENV:-$ROOT/.venv}
case "$VENV" in /*) ;; *) VENV=$PWD/$VENV;; esac
STAMPS=$VENV/.openvla_stamps
MODE=${OPENVLA_ROS:-pypi}
PLAN=0
for a in "$@"; do
  case "$a" in
    --ros=*) MODE=${a#--ros=};;
    --plan) PLAN=1;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0;;
    *) echo "error: unknown argument '$a' (use --ros=pypi|system, --plan)" >&2; exit 2;;
  esac
done
log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }
plan() { printf '%-13s %s\n' "$1:" "$2"; }

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
[ "$MODE" = pypi ] || [ "$MODE" = system ] || die "ROS must be pypi or system, got '$MODE' (make setup ROS=system on a robot with apt ROS 2)"

# --- what is sourced in this shell -------------------------------------------------------------
# A ROS distribution prefix: an AMENT_PREFIX_PATH entry (not our venv) whose ament index has rclpy.
ros_prefixes() {
  local IFS=: p
  for p in ${AMENT_PREFIX_PATH:-}; do
    [ -n "$p" ] && [ "${p%/}" != "${VENV%/}" ] && [ -e "$p/share/ament_index/resource_index/packages/rclpy" ] && echo "$p"
  done
  return 0
}
SOURCED_PREFIXES=$(ros_prefixes | paste -sd: -)
# The existing venv: none | pypi (no system site-packages) | system (--system-site-packages).
venv_kind() {
  [ -f "$VENV/pyvenv.cfg" ] || { echo none; return; }
  if grep -qiE '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg"; then echo system; else echo pypi; fi
}
VENV_KIND=$(venv_kind)
# ROS wheels inside the venv itself (whatever the venv kind)
venv_has_ros_wheels() {
  [ -x "$VENV/bin/python" ] && compgen -G "$VENV/lib/python3*/site-packages/rclpy" >/dev/null
}

if [ "$MODE" = pypi ]; then
  if [ -n "${ROS_DISTRO:-}" ] || [ -n "$SOURCED_PREFIXES" ]; then
    die "a ROS 2 installation is sourced in this shell (ROS_DISTRO=${ROS_DISTRO:-unset}${SOURCED_PREFIXES:+, AMENT_PREFIX_PATH has $SOURCED_PREFIXES}). The default setup installs ROS 2 from PyPI wheels into $VENV, and two rclpy builds in one process break. On a robot with apt ROS 2 use: make setup ROS=system (docs/ros_node.md, \"Robot install\"); for the PyPI venv open a shell that has not sourced /opt/ros/*/setup.bash."
  fi
  [ "$VENV_KIND" = system ] && die "$VENV was created by 'make setup ROS=system' (it sees the system's site-packages); the PyPI-ROS setup needs its own venv: make setup VENV=.venv-dev, or remove $VENV (make clean-venv) first."
  if [ $PLAN = 1 ]; then
    plan mode "pypi (ROS 2 Jazzy from PyPI wheels in the venv)"
    plan python "Python 3.12 (PATH or pyenv)"
    plan venv "$VENV (isolated; $VENV_KIND now)"
    plan requirements "requirements/dev.txt -c requirements/constraints.txt"
    plan checks "no sourced ROS (ROS_DISTRO, AMENT_PREFIX_PATH); venv not a --system-site-packages one; pip check"
    plan then "CMake include fix, msg/ build into the venv, loopback DDS .pth, editable install"
    exit 0
  fi
fi

if [ "$MODE" = system ]; then
  [ -n "${ROS_DISTRO:-}" ] && [ -n "$SOURCED_PREFIXES" ] || die "ROS=system uses the distribution's ROS 2, which is not sourced in this shell (ROS_DISTRO=${ROS_DISTRO:-unset}, no AMENT_PREFIX_PATH entry with rclpy). Run: source /opt/ros/jazzy/setup.bash, then make setup ROS=system."
  [ "$VENV_KIND" = pypi ] && die "$VENV was created by the PyPI-ROS setup (make setup): it cannot share a process with the distro's rclpy. Use another venv (make setup ROS=system VENV=.venv-robot) or remove $VENV (make clean-venv) first."
  venv_has_ros_wheels && die "$VENV holds ROS wheels (rclpy in its site-packages), which would shadow the distro's: remove $VENV (make clean-venv) and run make setup ROS=system again."
  SYSPY=$(command -v python3) || die "python3 not found on PATH (the distro's interpreter, e.g. /usr/bin/python3)"
  # The interpreter the distro's rclpy is built for, its numpy (the messages' C code was built
  # against it), and where rclpy comes from (must be the sourced distro, not a pip install).
  PROBE=$("$SYSPY" -c 'import sys, rclpy
try:
    import numpy; np = numpy.__version__
except ImportError:
    np = ""
print("%d.%d" % sys.version_info[:2]); print(rclpy.__file__); print(np)' 2>&1) \
    || die "$SYSPY cannot import rclpy although ROS $ROS_DISTRO is sourced: $(printf '%s' "$PROBE" | tail -1)"
  PYVER=$(sed -n 1p <<<"$PROBE"); RCLPY=$(sed -n 2p <<<"$PROBE"); SYSNUMPY=$(sed -n 3p <<<"$PROBE")
  # The distro's message modules are C extensions built against its numpy: keep that major version
  # (numpy's C ABI holds across 1.x minor versions, not from 1.x to 2.x).
  NUMPY_PIN=""
  [ -n "$SYSNUMPY" ] && NUMPY_PIN="numpy<$(( ${SYSNUMPY%%.*} + 1 ))"
  from_distro=0
  IFS=: read -r -a _pfx <<<"$SOURCED_PREFIXES"
  for p in "${_pfx[@]}"; do case "$RCLPY" in "${p%/}"/*) from_distro=1;; esac; done
  [ $from_distro = 1 ] || die "$SYSPY imports rclpy from $RCLPY, not from the sourced ROS $ROS_DISTRO ($SOURCED_PREFIXES): a pip-installed rclpy would mix two ROS builds. Remove it (pip uninstall rclpy ros-jazzy-rclpy) and run again."
  if [ $PLAN = 1 ]; then
    plan mode "system (ROS 2 $ROS_DISTRO from $SOURCED_PREFIXES)"
    plan python "$SYSPY ($PYVER), rclpy from $RCLPY"
    plan venv "$VENV (--system-site-packages; $VENV_KIND now)"
    plan requirements "requirements/robot.txt${NUMPY_PIN:+ -c $NUMPY_PIN (the distro has numpy $SYSNUMPY)}"
    plan checks "ROS sourced (ROS_DISTRO, AMENT_PREFIX_PATH); rclpy from the distro; venv not a PyPI-ROS one; no ROS wheels in the venv after install; pip check"
    plan then "no msg build, no editable install, no loopback DDS .pth: colcon build the package in your ROS workspace"
    exit 0
  fi
  # 1s. venv sharing the distro's site-packages
  if [ "$VENV_KIND" = none ]; then
    log "creating $VENV with $SYSPY --system-site-packages (ROS 2 $ROS_DISTRO from $SOURCED_PREFIXES)"
    "$SYSPY" -m venv --system-site-packages "$VENV"
  fi
  VPY=$VENV/bin/python
  CONSTRAINT=$VENV/openvla_system_constraints.txt
  : >"$CONSTRAINT"
  [ -n "$NUMPY_PIN" ] && echo "$NUMPY_PIN" >"$CONSTRAINT"
  # 2s. the model stack only
  REQ_HASH=$(hash_of "$ROOT/requirements/robot.txt" "$CONSTRAINT")
  if ! stamp_ok pip "$REQ_HASH"; then
    log "installing requirements/robot.txt (torch, transformers, timm, ttnn, ...${NUMPY_PIN:+; $NUMPY_PIN like the distro})"
    "$VPY" -m pip install -q -r "$ROOT/requirements/robot.txt" -c "$CONSTRAINT"
    stamp_set pip "$REQ_HASH"
  fi
  venv_has_ros_wheels && die "a ROS wheel (rclpy) was installed into $VENV by a requirement: it would shadow the distro's; remove it (pip uninstall) and check requirements/robot.txt."
  # (apt's Python packages may carry metadata pip check dislikes: report, do not fail)
  "$VPY" -m pip check >/dev/null 2>&1 || { log "warning: pip check reports:"; "$VPY" -m pip check >&2 || true; }
  where=$("$VPY" -c 'import rclpy, torch; print(rclpy.__file__)') || die "rclpy + torch do not import together in $VENV"
  case "$where" in "$VENV"/*) die "rclpy resolves inside $VENV ($where), not from ROS $ROS_DISTRO";; esac
  log "ready: $VENV (system ROS 2 $ROS_DISTRO, rclpy from ${where%/__init__.py}). Next, in your ROS workspace:"
  log "  source $VENV/bin/activate && colcon build --packages-select openvla_ros && source install/setup.bash"
  log "  ros2 launch openvla_ros openvla.launch.py mesh_device:=N300 weights_path:=/path/to/openvla-7b"
  exit 0
fi

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
