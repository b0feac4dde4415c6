"""The replay driver: checks the options and the output folder, runs the offline or live mode,
and writes the report into `<out>.incomplete`, renamed into place when complete (or marked partial).

Imports flow one way: cli -> run -> offline | live -> frames (the per-frame helpers both modes
share) -> options, bag. offline and live are imported when chosen (torch / rclpy are heavy)."""
from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np

from . import metrics
from .bag import BagEpisode, ReplayError, write_action_bag
from .frames import expected_selected
from .options import ReplayOptions, check_options
from .output import check_out, create_incomplete, publish
from .report import plot_all, write_csv, write_json, write_report


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
    check_options(o)
    out, tmp = check_out(o.out, o.bag, o.force)  # before any work: a refused output costs nothing
    ep = BagEpisode(o.bag, o.image_topic, o.instruction_topic, o.gt_action_topic,
                    need_instruction_topic=not o.instruction, twist_period_s=o.twist_period_s)
    if not o.instruction:
        if not ep.instructions:
            raise ReplayError(f"instruction topic {ep.instruction_topic} has no messages; pass --instruction TEXT")
    create_incomplete(tmp, o.force, o.bag)
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
        shutil.rmtree(tmp, ignore_errors=True)  # ours: created exclusively above
        raise
    publish(tmp, out, o.force)
    return out, summary


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
        "speculative": metrics.speculation_summary(info.get("speculative")),
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
