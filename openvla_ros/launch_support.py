"""How the launch files start our executables (one rule for every launch file): the
colcon-installed one when the package is in the ament index (what `ros2 run` uses), else the pip
console script beside this Python, else `python -m <module>` (dev venv, source tree)."""
from __future__ import annotations

import os
import sys


def _installed(executable: str) -> str | None:
    try:
        from ament_index_python.packages import get_package_prefix

        path = os.path.join(get_package_prefix("openvla_ros"), "lib", "openvla_ros", executable)
    except Exception:  # noqa: BLE001 - not in the ament index
        return None
    return path if os.access(path, os.X_OK) else None


def executable_command(module: str, executable: str) -> list[str]:
    """argv prefix for ExecuteProcess."""
    installed = _installed(executable)
    if installed:
        return [installed]
    script = os.path.join(os.path.dirname(sys.executable), executable)
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", module]


def node_command(module: str, executable: str) -> dict:
    """launch_ros Node kwargs."""
    if _installed(executable):
        return {"package": "openvla_ros", "executable": executable}
    cmd = executable_command(module, executable)
    return {"executable": cmd[0], "arguments": cmd[1:]} if len(cmd) > 1 else {"executable": cmd[0]}
