"""The replay driver: checks the options and the output folder, runs the offline or live mode
(several streams: offline, batched; live, into the node's streams at once), and writes the
report into `<out>.incomplete`, renamed into place when complete (or marked partial).

Imports flow one way: cli -> run -> offline | live -> frames (the per-frame helpers both modes
share) -> options, bag (live also uses options.node_topic). offline and live are imported when
chosen (torch / rclpy are heavy)."""
from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np

from . import metrics
from .bag import BagEpisode, ReplayError, write_action_bag
from .frames import expected_selected
from .options import ReplayOptions, check_options, stream_specs
from .output import check_out, create_incomplete, publish
from .report import plot_all, write_csv, write_json, write_report, write_streams_report


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


def open_episode(o: ReplayOptions, bag, image_topic) -> BagEpisode:
    ep = BagEpisode(bag, image_topic, o.instruction_topic, o.gt_action_topic,
                    need_instruction_topic=not o.instruction, twist_period_s=o.twist_period_s)
    if not o.instruction and not ep.instructions:
        raise ReplayError(f"instruction topic {ep.instruction_topic} has no messages in {ep.path}; "
                          "pass --instruction TEXT")
    return ep


def _check_instruction_timing(ep: BagEpisode, rows: list) -> None:
    if rows and all(r["status"] == "no_instruction" for r in rows):
        raise ReplayError(
            f"mismatched instruction timing: the first instruction on {ep.instruction_topic} is recorded "
            f"{(ep.instructions[0][0] - ep.start_ns) / 1e9:.3f} s into the bag {ep.path.name}, after every selected "
            "image; pass --instruction TEXT")


def run_replay(o: ReplayOptions) -> tuple[Path, dict]:
    """One stream: the report in --out. Several streams: one report per stream in --out/<stream>/
    (offline: each what a single-stream replay of that stream writes, the latency aside; live:
    each stream's frames, actions, drops and latency, and the node's status of that stream), and
    an overview (summary.json, report.md) in --out."""
    check_options(o)
    specs = stream_specs(o)
    bags = [sp.bag for sp in specs]
    out, tmp = check_out(o.out, bags if len(specs) > 1 else bags[0], o.force)  # before any work
    eps = [open_episode(o, sp.bag, sp.image_topic) for sp in specs]
    create_incomplete(tmp, o.force, bags)
    try:
        with _Interrupt() as stop:
            if o.mode == "offline" and len(eps) > 1:
                from .offline import run_offline_streams

                results, batch_info = run_offline_streams(eps, o, stop)
            elif o.mode == "offline":
                from .offline import run_offline

                results, batch_info = [run_offline(eps[0], o, stop)], None
            else:
                from .live import run_live_streams

                results, batch_info = run_live_streams(eps, o, stop, [sp.node_stream for sp in specs])
        for ep, (rows, _) in zip(eps, results):
            _check_instruction_timing(ep, rows)
        if len(eps) == 1:
            summary = finalize(tmp, eps[0], o, *results[0], partial=stop.hit)
        else:
            per_stream = {}
            for sp, ep, (rows, info) in zip(specs, eps, results):
                (tmp / sp.name).mkdir()
                per_stream[sp.name] = finalize(tmp / sp.name, ep, o, rows, info, partial=stop.hit)
            summary = streams_overview(per_stream, batch_info, o, partial=stop.hit)
            write_json(tmp / "summary.json", summary)
            write_streams_report(tmp, summary)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: created exclusively above
        raise
    publish(tmp, out, o.force)
    return out, summary


def streams_overview(per_stream: dict, batch_info: dict | None, o: ReplayOptions, partial: bool) -> dict:
    """The top-level summary of a several-stream replay: each stream's headline figures (its full
    summary is in <stream>/summary.json) and how the frames were batched (live: by the node)."""
    first = next(iter(per_stream.values()))
    streams = {}
    for name, s in per_stream.items():
        errs = s["errors_vs_gt"]
        maes = [e["mae"] for e in errs.values() if e["mae"] is not None] if errs else []
        streams[name] = {"folder": name, "bag": s["bag"]["path"], "image_topic": s["bag"]["image_topic"],
                         "instruction": s["instruction"], "frames": s["frames"], "latency_ms": s["latency_ms"],
                         "achieved_rate_hz": s["achieved_rate_hz"],
                         "mean_mae": float(np.mean(maes)) if maes else None,
                         "gripper_agreement": s["gripper_agreement"],
                         "mean_accepted": (s["speculative"] or {}).get("mean_accepted")}
        if "node_stream" in s["model"]:  # live: the node stream it was played into
            streams[name].update(node_stream=s["model"]["node_stream"], action_topic=s["model"]["action_topic"])
    return {"partial": bool(partial), "mode": o.mode, "streams": streams, "batch": batch_info,
            "model": first["model"], "unnorm_key": first["unnorm_key"],
            "timing_s": {"total": max(s["timing_s"].get("total", 0.0) for s in per_stream.values())}}


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
