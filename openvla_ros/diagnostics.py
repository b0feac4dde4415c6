"""Node statistics (thread-safe counters, latency percentiles, achieved rate) and the
/diagnostics status built from them. The level rules live in `assess()` (pure, testable)."""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from openvla_model.speculative import AcceptanceStats

OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels

COUNTERS = (
    "frames_received",          # image messages handed to the node while active
    "frames_dropped",           # replaced by a newer frame before inference started (no backlog)
    "frames_processed",         # inferences started
    "actions_published",        # on `action` (motion enabled)
    "actions_previewed",        # on `action_preview`
    "actions_clipped",          # actions with at least one axis clipped to its limit
    "rejected_stale_image",     # older than max_image_age_s (before inference or before publishing)
    "rejected_bad_image",       # malformed / unsupported image message
    "rejected_bad_input",       # refused by the model's input checks (InputError)
    "rejected_invalid_result",  # out-of-range tokens or NaN/inf values
    "rejected_no_instruction",  # frames with no instruction to act on
    "rejected_stale_instruction",  # instruction too old, or changed/cleared during inference
    "instructions_received",
    "instructions_rejected",    # empty, too long, non-printable (the current instruction is cleared)
    "inference_errors",         # backend failures and unexpected exceptions
    "callback_errors",          # exceptions caught in subscription / service / timer callbacks
    "stale_input_stops",        # zero-motion stops because the camera input went stale while enabled
)
REJECTED = tuple(c for c in COUNTERS if c.startswith("rejected_"))


class Stats:
    """Counters and windows shared by the executor thread and the inference worker.

    parent: the node's Stats when this one is a stream's (several streams): counters, published
    actions and speculative acceptance are added to the parent too, so the node's totals are
    the sum over its streams. Errors, failures and model times stay with the Stats they are
    recorded on (a stream's own, or the node's for a whole batch)."""

    def __init__(self, window: int = 200, rate_window_s: float = 10.0, parent: "Stats | None" = None):
        self.parent = parent
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.model_ms: deque = deque(maxlen=window)
        self.latency_ms: deque = deque(maxlen=window)
        self.overhead_ms: deque = deque(maxlen=window)
        self._published: deque = deque()
        self._rate_window_s = rate_window_s
        self.consecutive_failures = 0
        self.last_error = ""
        self.last_error_time = 0.0
        self.last_rejection_time = 0.0
        self.last_image_monotonic = 0.0
        self.acceptance = AcceptanceStats()  # speculative decoding: drafts offered / accepted

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n
            if name.startswith("rejected_") and name != "rejected_no_instruction":
                self.last_rejection_time = time.monotonic()
        if self.parent is not None:
            self.parent.inc(name, n)

    def image_received(self) -> None:
        self.last_image_monotonic = time.monotonic()
        if self.parent is not None:
            self.parent.image_received()

    def error(self, message: str, *, failure: bool = False) -> None:
        with self._lock:
            self.last_error = message
            self.last_error_time = time.monotonic()
            if failure:
                self.consecutive_failures += 1

    def success(self, model_ms: float, overhead_ms: float) -> None:
        with self._lock:
            self.consecutive_failures = 0
            self.model_ms.append(model_ms)
            self.overhead_ms.append(overhead_ms)

    def speculation(self, drafted: bool, accepted: int) -> None:
        """One model result with speculative decoding on: whether it had a draft, how many of
        the draft's tokens were accepted."""
        with self._lock:
            self.acceptance.record(drafted, accepted)
        if self.parent is not None:
            self.parent.speculation(drafted, accepted)

    def published(self, latency_ms: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.latency_ms.append(latency_ms)
            self._published.append(now)
            while self._published and now - self._published[0] > self._rate_window_s:
                self._published.popleft()
        if self.parent is not None:
            self.parent.published(latency_ms)

    def achieved_rate_hz(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._published if now - t <= self._rate_window_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "counts": dict(self.counts),
                "model_ms": list(self.model_ms), "latency_ms": list(self.latency_ms),
                "overhead_ms": list(self.overhead_ms),
                "consecutive_failures": self.consecutive_failures, "last_error": self.last_error,
                "speculative": self.acceptance.as_dict(),
                "last_error_age_s": time.monotonic() - self.last_error_time if self.last_error_time else None,
                "last_rejection_age_s": (time.monotonic() - self.last_rejection_time
                                         if self.last_rejection_time else None),
            }


def stats_values(stats: Stats) -> dict:
    """The /diagnostics values of one Stats: speculative acceptance, times, rate, counters."""
    snap = stats.snapshot()
    counts, spec = snap["counts"], snap["speculative"]
    return {
        "speculative_drafted": spec["drafted"],
        "speculative_accepted_total": spec["accepted_total"],
        "speculative_acceptance_rate": spec["acceptance_rate"],
        "speculative_mean_accepted": spec["mean_accepted"],
        "model_ms_p50": percentile(snap["model_ms"], 50),
        "model_ms_p95": percentile(snap["model_ms"], 95),
        "latency_ms_p50": percentile(snap["latency_ms"], 50),
        "latency_ms_p95": percentile(snap["latency_ms"], 95),
        "node_overhead_ms_p50": percentile(snap["overhead_ms"], 50),
        "achieved_rate_hz": stats.achieved_rate_hz(),
        **counts,
        "rejected_total": sum(counts[c] for c in REJECTED),
        "consecutive_failures": snap["consecutive_failures"],
        "last_error": snap["last_error"],
    }


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else float("nan")


@dataclass
class Health:
    lifecycle_state: str  # unconfigured | inactive | active | finalized
    load_error: str  # why configure failed ("" if it did not)
    worker_alive: bool
    enabled: bool
    consecutive_failures: int
    has_instruction: bool
    instruction_problem: str | None  # None, "no instruction", or a staleness reason
    seconds_since_image: float | None  # None = no image yet
    last_image_problem: str | None  # why the newest frame was not acted on (stale / bad), if it was not
    recent_rejection: bool  # a frame was rejected by safety in the last diagnostics period
    max_image_age_s: float
    stale_input: str | None = None  # motion enabled and the newest frame too old: why


FAILURES_FOR_ERROR = 3


def assess(h: Health) -> tuple[int, str]:
    """Level and one-line message for /diagnostics."""
    if h.load_error:
        return ERROR, f"policy not loaded: {h.load_error}"
    if h.lifecycle_state == "active" and not h.worker_alive:
        return ERROR, "inference worker thread died"
    if h.consecutive_failures >= FAILURES_FOR_ERROR:
        return ERROR, f"inference failing ({h.consecutive_failures} in a row)"
    if h.lifecycle_state != "active":
        return WARN, f"not active (lifecycle state {h.lifecycle_state})"
    if h.stale_input:
        return WARN, f"not acting: stale input, robot stopped until fresh frames arrive ({h.stale_input})"
    if h.seconds_since_image is None:
        return WARN, "no camera images received"
    if h.seconds_since_image > max(2.0 * h.max_image_age_s, 1.0):
        return WARN, f"no camera images for {h.seconds_since_image:.1f} s"
    if h.last_image_problem:
        return WARN, f"not acting: {h.last_image_problem}"
    if h.instruction_problem and h.instruction_problem != "no instruction":
        return WARN, f"not acting: {h.instruction_problem}"
    if h.recent_rejection:
        return WARN, "actions rejected by safety checks (see counters)"
    if h.instruction_problem == "no instruction":
        return OK, "idle: waiting for an instruction"
    if not h.enabled:
        return OK, "running, motion DISABLED (dry run: actions on action_preview only)"
    return OK, "running"


def build_status(name: str, hardware_id: str, level: int, message: str, values: dict):
    from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

    st = DiagnosticStatus()
    st.level = bytes([level])
    st.name = name
    st.message = message
    st.hardware_id = hardware_id
    st.values = [KeyValue(key=str(k), value=_fmt(v)) for k, v in values.items()]
    return st


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.3f}"
    return str(v)


def status_to_dict(status) -> dict:
    """DiagnosticStatus -> {level, name, message, hardware_id, values{key: str}} (for tests and tools)."""
    level = status.level
    level = level[0] if isinstance(level, (bytes, bytearray)) else int(level)
    return {"level": level, "name": status.name, "message": status.message, "hardware_id": status.hardware_id,
            "values": {kv.key: kv.value for kv in status.values}}
