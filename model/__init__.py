"""openvla_model: the ROS-free OpenVLA-7B pipeline (imported from the model/ directory).

Public API: load_policy, OpenVLAPolicy, ActionResult, STAGES, and the error classes.

Importing the package (or a light submodule such as ``openvla_model.synthetic``) does not import
torch: the policy names are resolved on first use (PEP 562 module ``__getattr__``), so helper
processes such as the synthetic camera start and exit quickly.
"""
from __future__ import annotations

import importlib

from .errors import (BackendError, CheckpointError, ConfigError, InputError, OpenVLAError,  # noqa: F401
                     UnnormKeyError)

# public name -> submodule that defines it (imported on first access)
_LAZY = {"STAGES": "policy", "ActionResult": "policy", "OpenVLAPolicy": "policy", "load_policy": "policy"}

__all__ = ["load_policy", "OpenVLAPolicy", "ActionResult", "STAGES", "OpenVLAError", "ConfigError",
           "CheckpointError", "InputError", "UnnormKeyError", "BackendError"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
