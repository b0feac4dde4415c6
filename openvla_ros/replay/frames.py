"""What the offline and live modes share per frame: which frames are replayed, each frame's
instruction and ground truth, and progress output. Imported by offline.py, live.py and run.py;
imports none of them."""
from __future__ import annotations

import math
import sys
import time

import numpy as np

from .bag import BagEpisode
from .options import ReplayOptions


class FrameSelector:
    """Every Nth frame, or the first frame at or after each control tick (by image stamp)."""

    def __init__(self, every: int = 1, control_rate_hz: float | None = None, max_frames: int | None = None):
        self.every, self.max_frames, self.taken, self.next_tick = every, max_frames, 0, None
        self.period = int(1e9 / control_rate_hz) if control_rate_hz else None

    @property
    def full(self) -> bool:
        return self.max_frames is not None and self.taken >= self.max_frames

    def accept(self, frame) -> bool:
        if self.full:
            return False
        if self.period:
            if self.next_tick is not None and frame.stamp_ns < self.next_tick:
                return False
            self.next_tick = (frame.stamp_ns if self.next_tick is None else self.next_tick) + self.period
            while self.next_tick <= frame.stamp_ns:
                self.next_tick += self.period
        elif frame.index % self.every:
            return False
        self.taken += 1
        return True


def select_frames(frames, every: int = 1, control_rate_hz: float | None = None, max_frames: int | None = None):
    sel = FrameSelector(every, control_rate_hz, max_frames)
    for f in frames:
        if sel.full:
            return
        if sel.accept(f):
            yield f


def expected_selected(ep: BagEpisode, o: ReplayOptions) -> int | None:
    if o.control_rate_hz:
        n = int(math.floor((ep.end_ns - ep.start_ns) / 1e9 * o.control_rate_hz)) + 1
        n = min(n, ep.num_frames)
    else:
        n = (ep.num_frames + o.every - 1) // o.every
    return min(n, o.max_frames) if o.max_frames else n


def frame_inputs(ep: BagEpisode, o: ReplayOptions, frame) -> tuple[str | None, np.ndarray | None]:
    instruction = o.instruction or ep.instruction_at(frame.bag_time_ns)
    gt = ep.ground_truth(frame, int(o.gt_tolerance_s * 1e9))
    return instruction, gt


class Progress:
    """tqdm on a terminal; a line every ~10% otherwise (CI logs, tests)."""

    def __init__(self, total: int | None, enabled: bool, desc: str):
        self.total, self.n, self.bar, self.enabled = total, 0, None, enabled
        self._last_pct = -1
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="frame", file=sys.stderr)
        self._t0 = time.perf_counter()

    def update(self, n: int = 1):
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            pct = int(100 * self.n / self.total) // 10 * 10 if self.total else -1
            if self.n == 1 or (pct != self._last_pct and pct >= 0):
                self._last_pct = pct
                print(f"[openvla-replay] {self.n}/{self.total or '?'} frames "
                      f"({time.perf_counter() - self._t0:.1f} s)", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
