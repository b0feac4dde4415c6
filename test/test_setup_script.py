"""scripts/setup_dev_env.sh chooses between the two ways of getting ROS 2 and refuses a mix
(two rclpy builds in one process break): `make setup` (ROS 2 from PyPI wheels in .venv) and
`make setup ROS=system` (a robot's apt ROS 2, sourced; a --system-site-packages venv with only the
model stack). Checked with --plan (decides, prints, changes nothing) against a FAKE sourced distro
(an ament prefix with an rclpy package and a numpy): no apt, no network, no venv is created."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ros_available

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "setup_dev_env.sh"
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)  # no ROS wheels, unlike the venv's


def fake_distro(root: Path, numpy_version: str = "1.26.4") -> Path:
    """/opt/ros/jazzy look-alike: ament index entry + importable rclpy and numpy."""
    prefix = root / "opt" / "ros" / "jazzy"
    (prefix / "share" / "ament_index" / "resource_index" / "packages").mkdir(parents=True)
    (prefix / "share" / "ament_index" / "resource_index" / "packages" / "rclpy").write_text("")
    site = prefix / "lib" / "python3" / "site-packages"
    for name, text in (("rclpy", ""), ("numpy", f"__version__ = {numpy_version!r}\n")):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(text)
    return prefix


def make_venv_dir(path: Path, system_site: bool, with_rclpy: bool = False) -> Path:
    """A directory that looks like a venv of either kind (pyvenv.cfg [+ an rclpy wheel])."""
    path.mkdir(parents=True)
    (path / "pyvenv.cfg").write_text(f"home = /usr/bin\ninclude-system-site-packages = {str(system_site).lower()}\n")
    (path / "bin").mkdir()
    os.symlink(BASE_PYTHON, path / "bin" / "python")
    if with_rclpy:
        (path / "lib" / "python3.12" / "site-packages" / "rclpy").mkdir(parents=True)
    return path


def run_plan(tmp_path: Path, *args: str, python3: str = BASE_PYTHON, **env) -> subprocess.CompletedProcess:
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "python3").write_text(f'#!/bin/sh\nexec "{python3}" "$@"\n')
    (fake_bin / "python3").chmod(0o755)
    full_env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "HOME": str(tmp_path),
                "OPENVLA_VENV": str(tmp_path / "venv"), **env}
    return subprocess.run(["bash", str(SCRIPT), "--plan", *args], env=full_env, capture_output=True, text=True,
                          timeout=60)


def sourced(prefix: Path, distro: str = "jazzy") -> dict:
    """What `source /opt/ros/jazzy/setup.bash` puts in the environment (the parts the script reads)."""
    return {"ROS_DISTRO": distro, "AMENT_PREFIX_PATH": str(prefix),
            "PYTHONPATH": str(prefix / "lib" / "python3" / "site-packages")}


def assert_refused(proc: subprocess.CompletedProcess, *needles: str):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert proc.stdout == ""  # no plan printed


def plan_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in proc.stdout.splitlines())}


def test_default_plan_installs_ros_from_pypi(tmp_path):
    plan = plan_of(run_plan(tmp_path))
    assert plan["mode"].startswith("pypi")
    assert plan["requirements"] == "requirements/dev.txt -c requirements/constraints.txt"
    assert "msg/ build" in plan["then"] and "loopback" in plan["then"]


@pytest.mark.parametrize("what", ["ROS_DISTRO", "AMENT_PREFIX_PATH", "both"])
def test_default_setup_refuses_a_sourced_distro(tmp_path, what):
    env = sourced(fake_distro(tmp_path))
    if what == "ROS_DISTRO":
        env.pop("AMENT_PREFIX_PATH")
    elif what == "AMENT_PREFIX_PATH":
        env.pop("ROS_DISTRO")
    assert_refused(run_plan(tmp_path, **env), "ROS 2 installation is sourced", "make setup ROS=system")
    assert_refused(run_plan(tmp_path, "--ros=pypi", **env), "two rclpy builds")


def test_default_setup_accepts_its_own_venv_and_workspaces_in_ament_prefix_path(tmp_path):
    venv = tmp_path / "venv"  # the dev venv has rclpy in its ament index: it is not "a sourced distro"
    (venv / "share" / "ament_index" / "resource_index" / "packages").mkdir(parents=True)
    (venv / "share" / "ament_index" / "resource_index" / "packages" / "rclpy").write_text("")
    overlay = tmp_path / "ws" / "install" / "openvla_ros"  # a colcon workspace built on the venv
    (overlay / "share" / "ament_index" / "resource_index" / "packages").mkdir(parents=True)
    proc = run_plan(tmp_path, AMENT_PREFIX_PATH=f"{overlay}:{venv}")
    assert plan_of(proc)["mode"].startswith("pypi")


def test_default_setup_refuses_a_robot_venv(tmp_path):
    make_venv_dir(tmp_path / "venv", system_site=True)
    assert_refused(run_plan(tmp_path), "ROS=system", "needs its own venv")


def test_system_plan_uses_the_distro_and_only_the_model_stack(tmp_path):
    prefix = fake_distro(tmp_path)
    plan = plan_of(run_plan(tmp_path, "--ros=system", **sourced(prefix)))
    assert plan["mode"] == f"system (ROS 2 jazzy from {prefix})"
    assert plan["requirements"] == "requirements/robot.txt -c numpy<2 (the distro has numpy 1.26.4)"
    assert "--system-site-packages" in plan["venv"]
    assert f"rclpy from {prefix}/" in plan["python"] and plan["python"].startswith(str(tmp_path / "fakebin"))
    assert "no msg build" in plan["then"] and "colcon build" in plan["then"]
    # the same through make, as docs/ros_node.md tells a robot user
    if shutil.which("make"):
        dry = subprocess.run(["make", "-n", "-C", str(ROOT), "setup", "ROS=system"], capture_output=True, text=True,
                             timeout=30)
        assert "--ros=system" in dry.stdout, dry.stdout + dry.stderr
    # numpy 2 on the distro: keep 2.x
    other = tmp_path / "numpy2"
    other.mkdir()
    plan = plan_of(run_plan(other, "--ros=system", **sourced(fake_distro(other, "2.1.0"))))
    assert plan["requirements"].startswith("requirements/robot.txt -c numpy<3")


def test_robot_requirements_hold_no_ros_wheels():
    names = [line.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
             for line in (ROOT / "requirements" / "robot.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert {"torch", "transformers", "timm", "ttnn"} <= set(names), names
    assert not [n for n in names if n.startswith(("ros-", "rclpy", "colcon", "catkin"))], names


def test_system_setup_refuses_without_a_sourced_distro(tmp_path):
    assert_refused(run_plan(tmp_path, "--ros=system"), "not sourced", "source /opt/ros/jazzy/setup.bash")
    # ROS_DISTRO alone (no distro prefix in AMENT_PREFIX_PATH) is not a sourced distro either
    assert_refused(run_plan(tmp_path, "--ros=system", ROS_DISTRO="jazzy"), "not sourced")


def test_system_setup_refuses_mixes(tmp_path):
    prefix = fake_distro(tmp_path)
    # an existing PyPI-ROS venv
    make_venv_dir(tmp_path / "venv", system_site=False)
    assert_refused(run_plan(tmp_path, "--ros=system", **sourced(prefix)), "PyPI-ROS setup", "VENV=.venv-robot")
    shutil.rmtree(tmp_path / "venv")
    # a robot venv that got ROS wheels
    make_venv_dir(tmp_path / "venv", system_site=True, with_rclpy=True)
    assert_refused(run_plan(tmp_path, "--ros=system", **sourced(prefix)), "holds ROS wheels")
    shutil.rmtree(tmp_path / "venv")
    # python3 imports an rclpy that is not the sourced distro's (e.g. a pip-installed one): this
    # venv's interpreter has the PyPI wheels and comes before the distro on sys.path here
    if not ros_available()[0]:
        pytest.skip(f"this venv has no importable rclpy to play the pip-installed one: {ros_available()[1]}")
    other = tmp_path / "other"
    other.mkdir()
    env = sourced(fake_distro(other))
    env.pop("PYTHONPATH")
    assert_refused(run_plan(other, "--ros=system", python3=sys.executable, **env), "not from the sourced ROS")


def test_unknown_mode_is_refused(tmp_path):
    assert_refused(run_plan(tmp_path, "--ros=conda"), "ROS must be pypi or system")
