"""Executing OpenVLA-OFT action chunks one step per control tick (no ROS: the node drives it and
tests drive it with a fake clock).

A chunk holds the next T actions predicted from one camera image; step k is planned for
`stamp + k * period` (the image stamp plus the step's offset). The node calls `offer()` when a
chunk arrives and `tick(now)` every `action_period_s`; each tick returns what to publish: one
`Step` (a safe action), one `Stop` (publish a zero-motion action and a zero twist), or None.

Replacement. A new chunk waits as `pending` (a newer one replaces it) and is adopted at the next
tick once the current chunk has executed `execute_steps` of its steps (0 = the whole chunk, the
default), or at once when nothing is executing. It never replays time already executed: the
robot moved during the ticks that went by between the new chunk's image and its adoption, so the
new chunk starts at step k0 = the number of steps executed after its image stamp (LeRobot's
async-inference rule by timestep; 0 when the robot stood still, e.g. for the first chunk). A
chunk whose every step is already covered that way is dropped (`expired`); a chunk whose image is
not newer than the one being executed or waiting is refused (out of order).

Temporal ensembling (optional, `ensemble_decay` > 0; ACT, Zhao et al. 2023, section 3.3): every
chunk stays in play until it runs out; each tick averages the steps all of them plan for this
tick with weights exp(-ensemble_decay * i), i = 0 for the OLDEST chunk (ACT's w_i: a smaller
decay incorporates new observations faster). New chunks join at the next tick with the same k0
rule; `execute_steps` does not apply.

Stops. Once per episode (only when a step went out since the last stop), the tick returns a
Stop when: the current chunk is fully executed and no new chunk is there; the step due is stale
(now - (stamp + k * period) > max_age_s); the step fails the safety checks (openvla_ros.safety:
non-finite values; clipping itself is applied, not a stop); or the caller reports an input
problem (stale camera, instruction cleared or expired). `cancel()` does the same for the caller's
reasons (instruction changed, motion disabled); `reset()` drops everything without a stop
(activation, enabling). Every step passes `make_safe_action` with the limits in force at that tick.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .safety import GripperConfig, MotionLimits, SafeAction, SafetyError, image_too_old, make_safe_action

NS = 1_000_000_000


@dataclass(frozen=True)
class Chunk:
    """One predicted chunk as the executor needs it."""

    actions: np.ndarray  # (T, D) float, robot units (un-normalised), step 0 first
    stamp_ns: int  # stamp of the image it was computed from
    period_s: float  # control period between its steps
    sequence: int = 0  # the node's chunk sequence number (for messages and logs)
    normalized: np.ndarray | None = None  # (T, D), [-1, 1]
    tokens: np.ndarray | None = None  # (T, D) discrete fallback only
    tag: object = None  # caller's data carried to every Step (e.g. the instruction it was made for)

    @property
    def num_steps(self) -> int:
        return int(self.actions.shape[0])

    def planned_ns(self, k: int) -> int:
        return self.stamp_ns + int(round(k * self.period_s * NS))


@dataclass(frozen=True)
class Step:
    """One action to publish now: step `index` of `chunk` after the safety checks."""

    chunk: Chunk  # the newest chunk contributing (the only one without ensembling)
    index: int  # step index in `chunk`
    safe: SafeAction
    action: np.ndarray  # the un-normalised values executed (ensembled when several chunks contribute)
    normalized: np.ndarray | None
    planned_ns: int  # when this step was planned for: chunk.stamp_ns + index * period
    contributors: int = 1  # chunks averaged (temporal ensembling)


@dataclass(frozen=True)
class Stop:
    reason: str


@dataclass
class ExecutorConfig:
    limits: MotionLimits
    gripper: GripperConfig
    max_age_s: float  # a step planned longer ago than this is stale (the node's max_image_age_s)
    execute_steps: int = 0  # steps of a chunk executed before a newer chunk replaces it; 0 = all
    ensemble_decay: float = 0.0  # > 0: ACT temporal ensembling with weights exp(-decay * i)

    def __post_init__(self):
        if not (math.isfinite(self.max_age_s) and self.max_age_s > 0):
            raise ValueError(f"max_age_s must be > 0, got {self.max_age_s}")
        if self.execute_steps < 0:
            raise ValueError(f"execute_steps must be >= 0 (0 = the whole chunk), got {self.execute_steps}")
        if not (math.isfinite(self.ensemble_decay) and self.ensemble_decay >= 0):
            raise ValueError(f"ensemble_decay must be >= 0 (0 = off), got {self.ensemble_decay}")


@dataclass
class _Running:
    chunk: Chunk
    next_index: int
    executed: int = 0  # steps of this chunk executed since its adoption


COUNTERS = ("chunks_offered", "chunks_refused", "chunks_superseded", "chunks_adopted", "chunks_expired",
            "chunks_completed", "steps_executed", "steps_skipped", "stops")


@dataclass
class ExecutorCounts:
    values: dict = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    def inc(self, name: str, n: int = 1) -> None:
        self.values[name] += n


class ChunkExecutor:
    """Thread-safe: offer() may come from the inference worker while tick() runs on a timer, and
    cancel() from a signal handler on the thread a tick was interrupted in (re-entrant lock)."""

    def __init__(self, config: ExecutorConfig):
        self.config = config
        self.counts = ExecutorCounts()
        self._lock = threading.RLock()  # re-entrant: a signal handler may cancel while a tick holds it
        self._running: list[_Running] = []  # the current chunk (or, ensembling, every chunk in play; oldest first)
        self._pending: list[Chunk] = []  # waiting for the next tick (ensembling: all of them, oldest first)
        self._executed_ns: deque[int] = deque()  # tick times at which a step went out (for k0)
        self._moved = False  # a step went out since the last stop
        self.last_refusal: str | None = None

    # -- state -------------------------------------------------------------------------------------
    @property
    def executing(self) -> bool:
        with self._lock:
            return bool(self._running or self._pending)

    def current(self) -> tuple[Chunk, int] | None:
        """(the newest chunk being executed, its next step index), or None."""
        with self._lock:
            return (self._running[-1].chunk, self._running[-1].next_index) if self._running else None

    def newest_stamp_ns(self) -> int | None:
        with self._lock:
            stamps = [r.chunk.stamp_ns for r in self._running] + [c.stamp_ns for c in self._pending]
            return max(stamps) if stamps else None

    # -- inputs ------------------------------------------------------------------------------------
    def offer(self, chunk: Chunk, now_ns: int) -> str | None:
        """A new chunk: None when it waits for the next tick, else why it was refused (counted)."""
        with self._lock:
            self.counts.inc("chunks_offered")
            reason = self._refusal(chunk, now_ns)
            if reason:
                self.counts.inc("chunks_refused")
                self.last_refusal = reason
                return reason
            if self.config.ensemble_decay > 0:
                self._pending.append(chunk)
            else:
                if self._pending:
                    self.counts.inc("chunks_superseded")
                self._pending = [chunk]
            return None

    def _refusal(self, chunk: Chunk, now_ns: int) -> str | None:
        a = np.asarray(chunk.actions)
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
            return f"chunk {chunk.sequence}: actions must be (steps, dims), got shape {list(a.shape)}"
        if not np.isfinite(a).all():
            return f"chunk {chunk.sequence}: non-finite action values"
        if not (math.isfinite(chunk.period_s) and chunk.period_s > 0):
            return f"chunk {chunk.sequence}: step period must be > 0, got {chunk.period_s}"
        too_old = image_too_old(chunk.stamp_ns, now_ns, self.config.max_age_s)
        if too_old:
            return f"chunk {chunk.sequence}: {too_old}"
        newest = max([r.chunk.stamp_ns for r in self._running] + [c.stamp_ns for c in self._pending], default=None)
        if newest is not None and chunk.stamp_ns <= newest:
            return (f"chunk {chunk.sequence}: its image ({chunk.stamp_ns} ns) is not newer than the chunk already "
                    f"executing or waiting ({newest} ns); out of order")
        return None

    def cancel(self, reason: str) -> Stop | None:
        """Drop every chunk. A Stop when a step went out since the last stop (publish it), else None."""
        with self._lock:
            return self._stop(reason)

    def reset(self, keep_pending: bool = False) -> None:
        """Drop every chunk (keep_pending: except those waiting for the next tick) and forget the
        executed steps, without a stop (the robot was not moving on our behalf: activation,
        enabling after a dry run)."""
        with self._lock:
            self._running = []
            if not keep_pending:
                self._pending = []
            self._executed_ns.clear()
            self._moved = False

    def note_stopped(self) -> None:
        """The caller published a stop of its own (e.g. its watchdog): the next episode needs a step first."""
        with self._lock:
            self._moved = False

    # -- the tick ----------------------------------------------------------------------------------
    def tick(self, now_ns: int, input_problem: str | None = None) -> Step | Stop | None:
        with self._lock:
            if input_problem:
                return self._stop(input_problem)
            self._prune(now_ns)
            self._adopt(now_ns)
            if not self._running:
                return self._stop("chunk fully executed and no new chunk arrived") if self._moved else None
            if self.config.ensemble_decay > 0:
                return self._ensemble_step(now_ns)
            run = self._running[0]
            stale = self._stale(run, now_ns)
            if stale:
                return self._stop(stale)
            k = run.next_index
            action = np.asarray(run.chunk.actions[k], dtype=np.float64)
            try:
                safe = make_safe_action(action, self.config.limits, self.config.gripper)
            except SafetyError as e:
                return self._stop(f"chunk {run.chunk.sequence} step {k} refused by the safety checks: {e}")
            normalized = None if run.chunk.normalized is None else np.asarray(run.chunk.normalized[k])
            self._advance(now_ns)
            return Step(run.chunk, k, safe, action, normalized, run.chunk.planned_ns(k))

    def _ensemble_step(self, now_ns: int) -> Step | Stop:
        for run in list(self._running):  # a stale member leaves; the others still plan this tick
            if self._stale(run, now_ns):
                self._running.remove(run)
        if not self._running:
            return self._stop("every chunk in play is stale")
        decay = self.config.ensemble_decay
        w = np.exp(-decay * np.arange(len(self._running)))  # i = 0: the oldest chunk
        acts = np.stack([np.asarray(r.chunk.actions[r.next_index], np.float64) for r in self._running])
        action = (w[:, None] * acts).sum(0) / w.sum()
        norms = [r.chunk.normalized for r in self._running]
        normalized = None
        if all(n is not None for n in norms):
            normalized = (w[:, None] * np.stack([np.asarray(n[r.next_index], np.float64)
                                                 for n, r in zip(norms, self._running)])).sum(0) / w.sum()
        newest = self._running[-1]
        try:
            safe = make_safe_action(action, self.config.limits, self.config.gripper)
        except SafetyError as e:
            return self._stop(f"ensembled step refused by the safety checks: {e}")
        k, n = newest.next_index, len(self._running)
        self._advance(now_ns)
        return Step(newest.chunk, k, safe, action, normalized, newest.chunk.planned_ns(k), contributors=n)

    # -- helpers (lock held) -----------------------------------------------------------------------
    def _steps_executed_since(self, stamp_ns: int, now_ns: int) -> int:
        return sum(1 for t in self._executed_ns if stamp_ns < t < now_ns)

    def _adopt(self, now_ns: int) -> None:
        ensemble = self.config.ensemble_decay > 0
        self._running = [r for r in self._running if r.next_index < r.chunk.num_steps]
        if not self._pending:
            return
        if not ensemble and self._running:
            run = self._running[0]
            limit = self.config.execute_steps or run.chunk.num_steps
            if run.executed < limit:
                return  # keep executing the current chunk; the pending one waits (or is superseded)
        for chunk in self._pending:
            k0 = self._steps_executed_since(chunk.stamp_ns, now_ns)
            if k0 >= chunk.num_steps:
                self.counts.inc("chunks_expired")
                continue
            self.counts.inc("chunks_adopted")
            self.counts.inc("steps_skipped", k0)
            if ensemble:
                self._running.append(_Running(chunk, k0))
            else:
                self._running = [_Running(chunk, k0)]
        self._pending = []

    def _stale(self, run: _Running, now_ns: int) -> str | None:
        k = run.next_index
        age_s = (now_ns - run.chunk.planned_ns(k)) / NS
        if age_s > self.config.max_age_s:
            return (f"step {k} of chunk {run.chunk.sequence} was planned {age_s:.3f} s ago "
                    f"(image stamp + {k} x {run.chunk.period_s:g} s; max {self.config.max_age_s:g} s): stale")
        return None

    def _advance(self, now_ns: int) -> None:
        for run in self._running:
            run.next_index += 1
            run.executed += 1
            if run.next_index >= run.chunk.num_steps:
                self.counts.inc("chunks_completed")
        self._executed_ns.append(now_ns)
        self._moved = True
        self.counts.inc("steps_executed")

    def _prune(self, now_ns: int) -> None:
        """Executed-step times older than any chunk that could still arrive (older than max_age_s)
        no longer matter for k0."""
        horizon = now_ns - int(self.config.max_age_s * NS) - NS
        while self._executed_ns and self._executed_ns[0] < horizon:
            self._executed_ns.popleft()

    def _stop(self, reason: str) -> Stop | None:
        self._running, self._pending = [], []
        if not self._moved:
            return None
        self._moved = False
        self.counts.inc("stops")
        return Stop(reason)
