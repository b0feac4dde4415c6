"""Static checks of the launch files (no process is started): every long-lived process gets a
deliberate `sigterm_timeout` (launch's default escalates SIGINT to SIGTERM after 5 s, which a
process cleaning up on a loaded machine can outlast: exit code -15 instead of 0)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("launch_ros", reason="launch_ros not installed (ROS 2 launch; not on PyPI)")
launch = pytest.importorskip("launch", reason="launch not installed (ROS 2 launch; not on PyPI)")
if not hasattr(launch, "LaunchContext"):  # the repo's launch/ folder shadowing a missing package
    pytest.skip("launch not installed (ROS 2 launch; not on PyPI)", allow_module_level=True)

from launch.actions import ExecuteProcess  # noqa: E402
from launch.substitutions import TextSubstitution  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILES = sorted((ROOT / "launch").glob("*.launch.py"))
DEFAULT_SIGTERM_TIMEOUT_S = 5.0


def _processes(launch_file: Path, arguments: dict) -> list[ExecuteProcess]:
    """The processes a launch file starts with these arguments (its OpaqueFunctions evaluated)."""
    spec = importlib.util.spec_from_file_location(launch_file.stem.replace(".", "_"), launch_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    context = launch.LaunchContext()
    context.launch_configurations.update(arguments)
    found = []
    pending = list(module.generate_launch_description().entities)
    while pending:
        entity = pending.pop(0)
        if isinstance(entity, ExecuteProcess):
            found.append(entity)
        elif isinstance(entity, (launch.actions.DeclareLaunchArgument, launch.actions.OpaqueFunction)):
            pending.extend(entity.execute(context) or [])
    return found


@pytest.mark.parametrize("launch_file", LAUNCH_FILES, ids=[f.name for f in LAUNCH_FILES])
def test_every_process_has_a_deliberate_sigterm_timeout(launch_file):
    processes = _processes(launch_file, {"weights_path": "/tmp/weights", "bag": "/tmp/bag"})
    assert processes, f"{launch_file.name} starts no process?"
    for proc in processes:
        timeout = proc.sigterm_timeout
        name = " ".join("".join(getattr(s, "text", "<subst>") for s in part) for part in proc.cmd)[:200]
        assert all(isinstance(s, TextSubstitution) for s in timeout), \
            f"{launch_file.name}: {name} uses launch's default sigterm_timeout"
        assert float("".join(s.text for s in timeout)) > DEFAULT_SIGTERM_TIMEOUT_S, name



def test_openvla_launch_remaps_the_oft_inputs():
    """openvla.launch.py's wrist_image_topic / proprio_topic reach the node as remappings (OpenVLA-OFT)."""
    (node,) = _processes(ROOT / "launch" / "openvla.launch.py",
                         {"wrist_image_topic": "/cam/wrist", "proprio_topic": "/arm/state"})
    node._perform_substitutions(launch.LaunchContext())
    rules = dict(node.expanded_remapping_rules)
    assert rules["wrist_image"] == "/cam/wrist" and rules["wrist_image/compressed"] == "/cam/wrist/compressed"
    assert rules["proprio"] == "/arm/state"
