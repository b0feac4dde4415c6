"""Errors raised by the OpenVLA pipeline. Each message names the file, key or value at fault."""


class OpenVLAError(Exception):
    """Base class: anything the pipeline rejects with a clear message."""


class ConfigError(OpenVLAError):
    """config.json / preprocessor_config.json missing, unreadable or inconsistent."""


class CheckpointError(OpenVLAError):
    """Weights missing, corrupt, mis-shaped, or with unknown keys."""


class NormStatsError(ConfigError, CheckpointError):
    """norm_stats (config.json or dataset_statistics.json) unusable by the action codec: both a
    config problem and a checkpoint problem, so either except clause catches it."""


class UnnormKeyError(OpenVLAError, KeyError):
    """unnorm_key missing (several datasets) or unknown; the message lists the valid keys."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class InputError(OpenVLAError, ValueError):
    """A bad image or instruction handed to predict()."""


class BackendError(OpenVLAError):
    """A backend could not be created or failed (device missing, failed to open, died)."""
