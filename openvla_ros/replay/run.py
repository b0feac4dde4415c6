"""Replay driver shared by the offline and live modes: frame selection, instruction and
ground-truth lookup, the output folder (finalised atomically, or marked partial)."""
from __future__ import annotations

import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import metrics
from .bag import BagEpisode, ReplayError, write_action_bag
from .report import plot_all, write_csv, write_json, write_report


@dataclass
class ReplayOptions:
    bag: str
    image_topic: str | None = None
    instruction_topic: str | None = None
    instruction: str | None = None
    gt_action_topic: str | None = None
    weights: str | None = None
    backend: str = "torch"
    device: str | None = None
    dtype: str | None = None
    mesh_device: str | None = None
    unnorm_key: str | None = None
    center_crop: bool = False
    mode: str = "offline"
    rate: float = 1.0
    every: int = 1
    control_rate_hz: float | None = None
    max_frames: int | None = None
    out: str | None = None
    force: bool = False
    gripper_threshold: float = 0.5
    twist_period_s: float = 0.2
    gt_tolerance_s: float = 0.05
    bag_version: int = 8
    progress: bool = True
    # live mode: the running node's topics (relative names resolve in the player's namespace)
    node_image_topic: str = "image"
    node_instruction_topic: str = "instruction"
    node_action_topic: str = "action_preview"
    wait_timeout_s: float = 60.0
    settle_s: float = 2.0


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


def _prepare_out(o: ReplayOptions, bag: Path) -> tuple[Path, Path]:
    out = Path(o.out) if o.out else Path.cwd() / f"{bag.name.rstrip('/')}_openvla_replay"
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not o.force:
        raise ReplayError(f"output folder {out} exists and is not empty (use --force to replace it)")
    tmp = out.with_name(out.name + ".incomplete")  # the name marks it until it is complete
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return out, tmp


class _Interrupt:
    """SIGINT/SIGTERM -> stop after the current frame and write a partial report."""

    def __init__(self):
        self.hit = False

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.hit:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def run_replay(o: ReplayOptions) -> tuple[Path, dict]:
    if o.mode not in ("offline", "live"):
        raise ReplayError(f"unknown mode {o.mode!r} (offline or live)")
    if o.every < 1 or (o.control_rate_hz is not None and o.control_rate_hz <= 0) or o.rate <= 0:
        raise ReplayError("--every must be >= 1 and --control-rate-hz / --rate > 0")
    ep = BagEpisode(o.bag, o.image_topic, o.instruction_topic, o.gt_action_topic,
                    need_instruction_topic=not o.instruction, twist_period_s=o.twist_period_s)
    if not o.instruction:
        if not ep.instructions:
            raise ReplayError(f"instruction topic {ep.instruction_topic} has no messages; pass --instruction TEXT")
    out, tmp = _prepare_out(o, ep.path)
    try:
        with _Interrupt() as stop:
            if o.mode == "offline":
                from .offline import run_offline

                rows, info = run_offline(ep, o, stop)
            else:
                from .live import run_live

                rows, info = run_live(ep, o, stop)
        if rows and all(r["status"] == "no_instruction" for r in rows):
            raise ReplayError(
                f"mismatched instruction timing: the first instruction on {ep.instruction_topic} is recorded "
                f"{(ep.instructions[0][0] - ep.start_ns) / 1e9:.3f} s into the bag, after every selected image; "
                "pass --instruction TEXT")
        summary = finalize(tmp, ep, o, rows, info, partial=stop.hit)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out, summary


def frame_inputs(ep: BagEpisode, o: ReplayOptions, frame) -> tuple[str | None, np.ndarray | None]:
    instruction = o.instruction or ep.instruction_at(frame.bag_time_ns)
    gt = ep.ground_truth(frame, int(o.gt_tolerance_s * 1e9))
    return instruction, gt


def finalize(out: Path, ep: BagEpisode, o: ReplayOptions, rows: list, info: dict, partial: bool) -> dict:
    done = [r for r in rows if r["status"] == "ok"]
    pred = np.array([r["action"] for r in done], dtype=np.float64).reshape(-1, 7)
    gt = np.array([r["gt"] if r.get("gt") is not None else [np.nan] * 7 for r in done], dtype=np.float64).reshape(-1, 7)
    has_gt = bool(np.isfinite(gt).any())
    latency = np.array([r["latency_ms"] for r in done], dtype=np.float64)
    done_t = np.array(info.get("done_times_s", []), dtype=np.float64)
    rate_t, rate = metrics.rolling_rate(done_t)
    oor = [int(r.get("out_of_range", 0)) for r in rows]
    summary = {
        "partial": bool(partial),
        "mode": o.mode,
        "bag": ep.identity(),
        "model": info.get("model", {}),
        "instruction": o.instruction or f"from {ep.instruction_topic}",
        "unnorm_key": info.get("unnorm_key"),
        "selection": {"every": o.every, "control_rate_hz": o.control_rate_hz, "max_frames": o.max_frames,
                      "rate": o.rate if o.mode == "live" else None},
        "frames": {"in_bag": ep.num_frames, "selected": info.get("selected", len(rows)),
                   "expected_selected": expected_selected(ep, o), "processed": len(done),
                   "rejected": sum(r["status"].startswith("rejected") for r in rows),
                   "dropped": sum(r["status"] == "dropped" for r in rows),
                   "no_instruction": sum(r["status"] == "no_instruction" for r in rows)},
        "out_of_range_tokens": int(sum(oor)),
        "frames_with_out_of_range": int(sum(1 for v in oor if v)),
        "latency_ms": metrics.latency_stats(latency),
        "achieved_rate_hz": metrics.achieved_rate(done_t),
        "gripper_threshold": o.gripper_threshold,
        "errors_vs_gt": metrics.action_errors(pred, gt) if has_gt else None,
        "gripper_agreement": metrics.gripper_agreement(pred[:, 6], gt[:, 6], o.gripper_threshold) if has_gt else None,
        "frames_with_gt": int(np.isfinite(gt).any(axis=1).sum()) if has_gt else 0,
        "timing_s": info.get("timing_s", {}),
    }
    write_csv(out / "actions.csv", rows)
    plots = plot_all(out, rows, latency, rate_t, rate, f"{ep.path.name}: predicted vs ground truth")
    storage = "mcap" if ep.storage == "mcap" else "sqlite3"
    summary["output_bag"] = {"path": "predictions_bag", "storage": storage, "topic": "/openvla/action",
                             "messages": write_action_bag(out / "predictions_bag", done, storage=storage,
                                                          version=o.bag_version)}
    write_json(out / "summary.json", summary)
    write_report(out, summary, plots)
    return summary


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
