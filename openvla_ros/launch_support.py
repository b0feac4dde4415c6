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


MESH_PROFILES = ("N300", "T3K")  # config/mesh/<name>.yaml exists for these


def truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def node_parameters(arg, config_dir: str, **overrides) -> list:
    """The node's `parameters` for openvla.launch.py and openvla_multi.launch.py, in this order:
    params_file, config/mesh/<mesh>.yaml (when mesh_device, or $MESH_DEVICE for auto, names a
    profile; else mesh_device itself), then the non-empty launch arguments and `overrides`.
    arg(name) -> the launch argument's stripped text."""
    mesh = arg("mesh_device")
    resolved_mesh = os.environ.get("MESH_DEVICE", "auto") if mesh == "auto" else mesh
    parameters = [arg("params_file")]
    values = {"start_enabled": truthy(arg("start_enabled")), "use_sim_time": truthy(arg("use_sim_time"))}
    if resolved_mesh in MESH_PROFILES:
        # the per-mesh file sets mesh_device itself (so /diagnostics shows the file was loaded)
        parameters.append(os.path.join(config_dir, "mesh", f"{resolved_mesh}.yaml"))
    else:
        values["mesh_device"] = mesh
    for name in ("weights_path", "backend", "device", "unnorm_key", "image_transport"):
        if arg(name):
            values[name] = arg(name)
    values.update(overrides)
    return parameters + [values]
