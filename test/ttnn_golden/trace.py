"""Trace capture and replay for GoldenTTNN, with a trace's contract.

A ttnn trace records the device commands issued between `begin_trace_capture` and
`end_trace_capture`; `execute_trace` replays them on the SAME device buffers: every tensor the
recorded ops read or write is addressed by where it was when captured, and no host transfer can
be part of it. `TracingGoldenTTNN` emulates exactly that on the emulator's tensors:

- while capturing, every ttnn call (op, collective, experimental op) is recorded with its
  argument objects and its result object; a host transfer (`from_torch` onto the device,
  `copy_host_to_device_tensor`, `to_torch`) raises, as it has no place in a trace;
- `execute_trace` calls the recorded ops again with the same argument objects and writes each
  new result INTO the recorded result object (its per-chip shards replaced in place), so a later
  recorded op reads what an earlier one produced on this replay, like a fixed device buffer.

What differs from a device: the emulator runs the ops while it records them (a device only
records); the backend sets every input of the traced steps before it captures, so running them
then changes nothing the replay reads before writing it.

Host transfers are counted per kind in `host_io` (writes: device `from_torch` and
`copy_host_to_device_tensor`; reads: `to_torch`), so tests can check an action's host traffic.
"""
from __future__ import annotations

from .emulator import GoldenTTNN, EmuTensor, _PASSTHROUGH
from .experimental_ops import PASSTHROUGH as _EXP_PASSTHROUGH

_HOST_IO = {"from_torch", "copy_host_to_device_tensor", "to_torch", "as_tensor"}
_TRACE_API = {"begin_trace_capture", "end_trace_capture", "execute_trace", "release_trace"}


class _Recorder:
    """A namespace (the emulator itself, .experimental, .transformer) whose calls are recorded."""

    def __init__(self, owner, target, prefix=""):
        self._owner, self._target, self._prefix = owner, target, prefix

    def __getattr__(self, name):
        attr = getattr(self._target, name)
        if name in ("experimental", "transformer"):
            return _Recorder(self._owner, attr, f"{name}.")
        if not callable(attr) or name in _PASSTHROUGH or name in _EXP_PASSTHROUGH or name in _TRACE_API:
            return attr
        owner, full = self._owner, self._prefix + name

        def call(*args, **kwargs):
            if full in _HOST_IO:
                owner._host_io(full, kwargs)
            result = attr(*args, **kwargs)
            if owner.capturing is not None:
                owner.traces[owner.capturing].append((full, attr, args, kwargs, result))
            return result
        return call


class TracingGoldenTTNN:
    """GoldenTTNN with traces. Use in place of `ttnn`: TtnnBackend(..., tt=TracingGoldenTTNN(2), trace=True)."""

    def __init__(self, available_devices: int):
        self.emu = GoldenTTNN(available_devices)
        self.traces: dict[int, list] = {}
        self._next_tid = 0
        self.capturing: int | None = None
        self.replays = 0
        self.replayed: list[int] = []  # trace ids in the order execute_trace replayed them
        self.host_io = {"write": 0, "read": 0}
        self._calls = _Recorder(self, self.emu)

    def __getattr__(self, name):
        return getattr(self._calls, name)

    def _host_io(self, name, kwargs):
        if name == "from_torch" and kwargs.get("device") is None:
            return  # a host tensor (copied later by copy_host_to_device_tensor)
        if self.capturing is not None:
            raise RuntimeError(f"host transfer {name} inside trace capture {self.capturing}")
        self.host_io["read" if name == "to_torch" else "write"] += 1

    # ---- the trace API ------------------------------------------------------------------------
    def begin_trace_capture(self, mesh, cq_id=0):
        if self.capturing is not None:
            raise RuntimeError("begin_trace_capture while capturing")
        tid = self._next_tid  # unique for the device's life, as ttnn's ids (never reused after a release)
        self._next_tid += 1
        self.traces[tid] = []
        self.capturing = tid
        return tid

    def end_trace_capture(self, mesh, tid, cq_id=0):
        if self.capturing != tid:
            raise RuntimeError(f"end_trace_capture({tid}) while capturing {self.capturing}")
        self.capturing = None

    def execute_trace(self, mesh, tid, cq_id=0, blocking=True):
        if self.capturing is not None:
            raise RuntimeError("execute_trace while capturing")
        self.replays += 1
        self.replayed.append(tid)
        for _, fn, args, kwargs, recorded in self.traces[tid]:
            _write_into(recorded, fn(*args, **kwargs))

    def release_trace(self, mesh, tid):
        del self.traces[tid]


def _write_into(recorded, fresh):
    """The replayed op's result into the buffer(s) the capture saw."""
    if isinstance(recorded, EmuTensor):
        if fresh is not recorded:
            recorded.shards[:] = fresh.shards
    elif isinstance(recorded, (list, tuple)):
        for r, f in zip(recorded, fresh, strict=True):
            _write_into(r, f)
