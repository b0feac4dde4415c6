"""`colcon build` of this repo in a fresh workspace (what a ROS 2 Jazzy/Humble user does) installs
the generated messages, our Python packages, executables, launch files and config, and they
import from the install space."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLCON = shutil.which("colcon") or str(Path(sys.executable).with_name("colcon"))

pytestmark = pytest.mark.skipif(not Path(COLCON).exists(), reason="colcon not installed (run `make setup`)")


def colcon_build(tmp_path: Path) -> tuple[Path, dict]:
    """Copy this repo into a fresh workspace tmp_path/ws/src/openvla_ros and `colcon build` it
    against the venv (as a ROS 2 user does against /opt/ros). Returns (workspace, build env)."""
    src = tmp_path / "ws" / "src" / "openvla_ros"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "install", "log", "generated", "__pycache__", ".pytest_cache", "*.egg-info"))
    ws = tmp_path / "ws"
    venv = Path(sys.prefix)
    env = {"HOME": os.environ.get("HOME", "/root"), "PATH": f"{venv}/bin:/usr/bin:/bin",
           "AMENT_PREFIX_PATH": str(venv), "CMAKE_PREFIX_PATH": str(venv)}
    build = subprocess.run([COLCON, "build", "--event-handlers", "console_direct-"], cwd=ws, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return ws, env


_BUILT: dict = {}  # one build per test session, shared with test_ros2_cli.py (it imports this module)


@pytest.fixture
def colcon_workspace(tmp_path_factory) -> tuple[Path, dict]:
    """A workspace with this repo colcon-built in it, built once per session. Read-only for tests."""
    if "ws" not in _BUILT:
        _BUILT["ws"] = colcon_build(tmp_path_factory.mktemp("colcon"))
    return _BUILT["ws"]


def test_colcon_build_installs_a_working_package(colcon_workspace):
    ws, env = colcon_workspace
    src = ws / "src" / "openvla_ros"

    prefix = ws / "install" / "openvla_ros"
    site = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for py in (src / "openvla_ros").rglob("*.py"):
        assert (site / "openvla_ros" / py.relative_to(src / "openvla_ros")).is_file(), py
    for py in (src / "model").rglob("*.py"):
        assert (site / "openvla_model" / py.relative_to(src / "model")).is_file(), py
    for exe in (src / "scripts" / "bin").iterdir():
        assert os.access(prefix / "lib" / "openvla_ros" / exe.name, os.X_OK), exe.name
    for f in list((src / "launch").glob("*")) + list((src / "config").rglob("*.yaml")):
        assert (prefix / "share" / "openvla_ros" / f.relative_to(src)).is_file(), f
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / "openvla_ros").is_file()

    check = (". install/setup.sh && cd / && python -c '"
             "import openvla_ros, openvla_ros.msg, openvla_model; "
             "from openvla_ros.msg import EndEffectorAction; EndEffectorAction(); "
             "print(openvla_ros.__path__[0]); print(openvla_model.__file__)' && "
             f"{prefix}/lib/openvla_ros/openvla-predict --help")
    run = subprocess.run(["sh", "-c", check], cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    first, second = run.stdout.splitlines()[:2]
    assert first.startswith(str(site)) and second.startswith(str(site)), run.stdout
    assert "usage: openvla-predict" in run.stdout
