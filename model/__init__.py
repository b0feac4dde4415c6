"""openvla_model: the ROS-free OpenVLA-7B pipeline (imported from the model/ directory).

Public API: load_policy, OpenVLAPolicy, ActionResult, and the error classes.
"""
from .errors import (BackendError, CheckpointError, ConfigError, InputError, OpenVLAError,  # noqa: F401
                     UnnormKeyError)
from .policy import STAGES, ActionResult, OpenVLAPolicy, load_policy  # noqa: F401
