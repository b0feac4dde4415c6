"""The `ros2` commands the README and docs/ros_node.md show a user, run for real: colcon-build
this repo into a scratch workspace, `ros2 launch openvla_ros openvla.launch.py` from it, and from
other processes `ros2 lifecycle get`, `ros2 param get`, `ros2 topic pub` (an instruction and one
image), `ros2 topic echo --once` (the dry-run action on action_preview) and `ros2 service call
.../enable`; then Ctrl-C (SIGINT) to `ros2 launch` must exit 0 and leave no process behind.

Needs the `ros2` CLI with ros2launch (ROS 2; not on PyPI: apt on a robot) and colcon. The CLI
calls use --no-daemon (+ --spin-time for discovery) so no ros2 daemon outlives the test.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import requires_ros
from test_colcon_build import COLCON, colcon_workspace  # noqa: F401 (fixture)

VENV = Path(sys.prefix)
ROS2 = shutil.which("ros2", path=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")


def _ros2_launch_available() -> bool:
    if ROS2 is None:
        return False
    import importlib.util

    return importlib.util.find_spec("ros2launch") is not None


pytestmark = [
    requires_ros,
    pytest.mark.skipif(not _ros2_launch_available(),
                       reason="the ros2 CLI with `ros2 launch` is not installed (ROS 2 ros2cli/ros2launch; "
                              "not on PyPI: apt on a ROS 2 machine, see docs/ros_node.md)"),
    pytest.mark.skipif(not Path(COLCON).exists(), reason="colcon not installed (run `make setup`)"),
]

MARKER_VAR = "OPENVLA_ROS2_CLI_TEST"
DISCOVERY = ["--no-daemon", "--spin-time", "2"]


def _sourced_env(ws: Path, base: dict) -> dict:
    """base + what `. install/setup.sh` adds (as a user's shell after sourcing the workspace)."""
    out = subprocess.run(["sh", "-c", ". install/setup.sh && env -0"], cwd=ws, env=base, capture_output=True,
                         timeout=60, check=True).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def _processes_with(marker: str) -> dict[int, str]:
    """Live processes whose environment carries the marker (everything this test started)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if f"{MARKER_VAR}={marker}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except OSError:  # gone meanwhile, or a zombie
            continue
    return found


class Ros2:
    def __init__(self, env: dict, cwd: Path):
        self.env, self.cwd = env, cwd

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([ROS2, *args], env=self.env, cwd=self.cwd, capture_output=True, text=True,
                              timeout=timeout)

    def start(self, *args: str, log: Path) -> subprocess.Popen:
        with open(log, "wb") as f:
            return subprocess.Popen([ROS2, *args], env=self.env, cwd=self.cwd, stdout=f, stderr=subprocess.STDOUT)

    def wait_for(self, args: tuple, predicate, timeout: float, what: str) -> str:
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            last = self.run(*args)
            if predicate(last.stdout):
                return last.stdout
            time.sleep(0.5)
        pytest.fail(f"{what}: not seen within {timeout} s; last `ros2 {' '.join(args)}`: "
                    f"rc={last.returncode} {last.stdout[-1000:]} {last.stderr[-1000:]}")


def test_ros2_cli_drives_the_launched_node(colcon_workspace, tmp_path, tiny_weights, ros_env):
    t0 = time.monotonic()
    phases = {}

    def phase(name):
        phases[name] = round(time.monotonic() - t0, 1)
        print(f"[{phases[name]:6.1f} s] {name}")

    ws, _ = colcon_workspace
    phase("colcon build (or the session's)")
    marker = uuid.uuid4().hex
    base = {**ros_env, "PATH": f"{VENV / 'bin'}{os.pathsep}{ros_env.get('PATH', '/usr/bin:/bin')}",
            "AMENT_PREFIX_PATH": str(VENV), "ROS_LOG_DIR": str(tmp_path / "ros_log"), MARKER_VAR: marker}
    base.pop("PYTHONPATH", None)
    ros2 = Ros2(_sourced_env(ws, base), tmp_path)
    launch_log, echo_log = tmp_path / "launch.log", tmp_path / "echo.log"

    launch = ros2.start("launch", "openvla_ros", "openvla.launch.py", "backend:=torch", "device:=cpu",
                        f"weights_path:={tiny_weights}", log=launch_log)
    echo = None
    try:
        # subscribe first: the dry-run action appears once, on action_preview
        echo = ros2.start("topic", "echo", "--once", *DISCOVERY, "/action_preview",
                          "openvla_ros/msg/EndEffectorAction", log=echo_log)
        ros2.wait_for(("lifecycle", "get", *DISCOVERY, "/openvla_node"), lambda out: out.startswith("active"),
                      timeout=180, what="/openvla_node active")  # a loaded 2-core box needed 72 s
        phase("ros2 lifecycle get: active")
        mesh = ros2.run("param", "get", *DISCOVERY, "/openvla_node", "mesh_device")
        backend = ros2.run("param", "get", *DISCOVERY, "/openvla_node", "backend")
        assert mesh.stdout.strip() == "String value is: auto", mesh.stdout + mesh.stderr
        assert backend.stdout.strip() == "String value is: torch", backend.stdout + backend.stderr
        ros2.wait_for(("topic", "info", *DISCOVERY, "/action_preview"),
                      lambda out: "Subscription count: 1" in out, timeout=30, what="echo subscribed")
        phase("ros2 param get x2, topic info")

        image = ("{header: {stamp: now, frame_id: camera}, height: 2, width: 2, encoding: rgb8, step: 6, "
                 "data: [200, 10, 10, 10, 200, 10, 10, 10, 200, 90, 90, 90]}")
        for attempt in range(3):  # a best-effort image sent while discovery settles may be lost: resend
            pub = ros2.run("topic", "pub", "--once", "/instruction", "std_msgs/msg/String",
                           "{data: 'pick up the red cup'}")
            assert pub.returncode == 0, pub.stdout + pub.stderr
            pub = ros2.run("topic", "pub", "--once", "/image", "sensor_msgs/msg/Image", image)
            assert pub.returncode == 0, pub.stdout + pub.stderr
            try:
                echo.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                continue
        assert echo.poll() == 0, f"no action after {attempt + 1} instruction + image: {echo_log.read_text()[-2000:]}"
        phase("ros2 topic pub x2, topic echo --once")
        action = yaml.safe_load(echo_log.read_text().split("---")[0])
        assert action["instruction"] == "pick up the red cup", action
        assert len(action["tokens"]) == 7 and action["unnorm_key"] == "bridge_orig", action
        assert action["header"]["stamp"]["sec"] > 0 and action["header"]["frame_id"] == "base_link", action

        enable = ros2.run("service", "call", "/openvla_node/enable", "std_srvs/srv/SetBool", "{data: true}")
        assert enable.returncode == 0 and "success=True" in enable.stdout, enable.stdout + enable.stderr
        phase("ros2 service call enable")
    finally:
        if echo is not None and echo.poll() is None:
            echo.kill()
            echo.wait()
        launch.send_signal(signal.SIGINT)  # what Ctrl-C in the user's terminal does
        try:
            rc = launch.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launch.kill()
            rc = "still running 60 s after SIGINT (killed)"
        phase("SIGINT: ros2 launch exited")
        left = {}
        for _ in range(20):  # launch reaps its children before it exits; allow for /proc lag
            left = _processes_with(marker)
            if not left:
                break
            time.sleep(0.25)
        for pid in left:  # reported below; not left running either way
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    log = launch_log.read_text(errors="replace")
    assert rc == 0, f"ros2 launch exit code {rc}:\n{log[-4000:]}"
    assert not left, f"processes left behind: {left}"
    assert "openvla_node-1]: process has finished cleanly" in log, log[-4000:]
    assert "motion enabled" in log and "Traceback" not in log, log[-4000:]
