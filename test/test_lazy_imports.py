"""Light processes stay light: importing openvla_model (or its numpy-only helpers) must not import
torch. The synthetic camera imports openvla_model.synthetic; with torch loaded it took ~1 s to
start and its exit cleanup outlasted launch's SIGINT->SIGTERM escalation on a loaded machine
(test_launch.py: "openvla_synthetic_camera exited with code -15")."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ros_available

HEAVY = ("torch", "transformers", "timm", "ttnn", "safetensors")

PROBE = """
import json, sys
{imports}
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def _heavy_modules_after(imports: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports, heavy=HEAVY)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("imports", [
    "import openvla_model.synthetic",
    "import openvla_model",
    "from openvla_model import InputError, OpenVLAError, UnnormKeyError",
])
def test_light_imports_do_not_load_torch(imports):
    assert _heavy_modules_after(imports) == []


@pytest.mark.skipif(not ros_available()[0], reason=ros_available()[1] or "ROS available")
def test_synthetic_camera_process_does_not_load_torch():
    assert _heavy_modules_after("import openvla_ros.synthetic_camera") == []


def test_public_names_still_import_from_the_package():
    code = """
import openvla_model
from openvla_model import (STAGES, ActionResult, BackendError, CheckpointError, ConfigError, InputError,
                           OpenVLAError, OpenVLAPolicy, UnnormKeyError, load_policy)
from openvla_model import policy, errors
assert load_policy is policy.load_policy and OpenVLAPolicy is policy.OpenVLAPolicy
assert ActionResult is policy.ActionResult and STAGES is policy.STAGES
assert InputError is errors.InputError
assert {"load_policy", "OpenVLAPolicy", "ActionResult", "STAGES"} <= set(dir(openvla_model))
assert set(openvla_model.__all__) <= set(dir(openvla_model))
try:
    openvla_model.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise SystemExit("no AttributeError")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
