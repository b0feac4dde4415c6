"""Imports flow from openvla_ros to the model code, never back; the model code never imports ROS."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROS_MODULES = ("rclpy", "openvla_ros", "sensor_msgs", "std_msgs", "geometry_msgs", "diagnostic_msgs",
               "rosbags", "launch", "launch_ros")


def imported_modules(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_model_code_never_imports_ros():
    files = sorted((ROOT / "model").rglob("*.py"))
    assert files
    offenders = [f"{f.relative_to(ROOT)}: {m}" for f in files for m in imported_modules(f)
                 if m.split(".")[0] in ROS_MODULES]
    assert not offenders, offenders
