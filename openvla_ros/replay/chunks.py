"""openvla-replay for OpenVLA-OFT checkpoints: one action chunk per selected frame, and every step
of every chunk judged against the ground truth at its future frame.

A chunk predicted from frame i holds the actions for frames i, i+1, ..., i+T-1 (the bag records one
image per control step, as RLDS-converted episodes do): step k is compared with the ground truth
of frame i+k (the same GT matching as the single-step replay: equal header stamp, else nearest
bag time within --gt-tolerance-s). Steps past the end of the bag have no GT and are left out.
The report gives, for each step k, the per-dimension MAE / RMSE / correlation over all chunks
(`chunk_errors.per_step`), step 0 also as the single-step `errors_vs_gt` (what the robot executes
first), and plots the error growth over the horizon and each chunk's trajectory against the GT.

Inputs beyond the camera image: `--wrist-image-topic` (sensor_msgs/Image or CompressedImage; the
newest wrist frame whose stamp is not newer than the primary frame's, at most WRIST_MAX_SKEW_S
older) and `--proprio-topic` (sensor_msgs/JointState by header stamp, or std_msgs/Float64MultiArray
by bag time: the newest message not newer than the frame, at most PROPRIO_MAX_SKEW_S older; all
its values in order, openvla_ros.oft_inputs). A checkpoint that takes 2 images or proprio without
them, or those topics given to a checkpoint that takes none, is one clear error before any work.

Offline mode, one stream. Files: chunks.csv (one row per chunk step), summary.json, report.md,
index.html, chunk_errors.png, chunk_actions.png (+ the output-folder rules of output.py).
"""
from __future__ import annotations

import csv
import html
import math
import shutil
import time
from pathlib import Path

import numpy as np

from ..image_conversion import DEFAULT_MAX_PIXELS
from . import metrics
from .bag import BagEpisode, ReplayError, stamp_ns
from .frames import FrameSelector, Progress, expected_selected, frame_inputs
from .metrics import DIMS
from .options import ReplayOptions, check_options
from .output import check_out, create_incomplete, publish
from .report import write_json
from .run import _Interrupt

WRIST_MAX_SKEW_S = 0.5
PROPRIO_MAX_SKEW_S = 0.5
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
PROPRIO_TYPES = {"sensor_msgs/msg/JointState": "joint_state", "std_msgs/msg/Float64MultiArray": "float64_array"}


def _one(v, what: str):
    if isinstance(v, (list, tuple)):
        if len(v) > 1:
            raise ReplayError(f"an OpenVLA-OFT checkpoint is replayed one stream at a time: give one {what}")
        return v[0] if v else None
    return v


def chunk_replay_wanted(o: ReplayOptions, wrist_image_topic: str | None = None,
                        proprio_topic: str | None = None) -> bool:
    """True for an offline replay of an OFT checkpoint (model/oft.checkpoint_kind). OFT-only options
    with another checkpoint or in live mode: ReplayError."""
    oft_only = [f for f, v in (("--wrist-image-topic", wrist_image_topic), ("--proprio-topic", proprio_topic)) if v]
    if o.mode != "offline":
        if oft_only:
            raise ReplayError(f"{', '.join(oft_only)}: only for the offline replay of an OpenVLA-OFT checkpoint")
        return False
    from openvla_model.oft import checkpoint_kind

    try:
        oft = bool(o.weights) and checkpoint_kind(o.weights) == "oft"
    except Exception:  # noqa: BLE001 - a bad weights path is reported by the replay that loads it
        oft = False
    if oft_only and not oft:
        raise ReplayError(f"{', '.join(oft_only)}: only for the offline replay of an OpenVLA-OFT checkpoint")
    return oft


class _Follower:
    """The newest message of an ordered stream whose key is <= a growing limit."""

    def __init__(self, messages, key):
        self._it, self.key = iter(messages), key
        self.current = None
        self._next = next(self._it, None)

    def at(self, limit: int):
        while self._next is not None and self.key(self._next) <= limit:
            self.current, self._next = self._next, next(self._it, None)
        return self.current


def _topic(ep: BagEpisode, topic: str | None, types, what: str) -> str | None:
    if not topic:
        return None
    if topic not in ep.topics:
        listing = ", ".join(f"{t} [{m}]" for t, (m, _) in sorted(ep.topics.items()))
        raise ReplayError(f"{what} topic {topic!r} not in the bag; topics present: {listing}")
    if ep.topics[topic][0] not in types:
        raise ReplayError(f"{what} topic {topic!r} has type {ep.topics[topic][0]}, supported: {', '.join(types)}")
    return topic


def chunk_errors(pred: np.ndarray, gt: np.ndarray, threshold: float) -> dict:
    """pred (N, T, 7) predicted chunks, gt (N, T, 7) the ground truth at each step's future frame
    (NaN where unknown) -> per step k: metrics.action_errors over the N chunks, the mean MAE over
    the dimensions that have GT, and the gripper agreement."""
    steps = []
    for k in range(pred.shape[1]):
        e = metrics.action_errors(pred[:, k], gt[:, k])
        maes = [d["mae"] for d in e.values() if d["mae"] is not None]
        steps.append({"step": k, "n": max(d["n"] for d in e.values()), "dims": e,
                      "mae_mean": float(np.mean(maes)) if maes else None,
                      "gripper_agreement": metrics.gripper_agreement(pred[:, k, 6], gt[:, k, 6], threshold)})
    return {"chunks": int(pred.shape[0]), "num_steps": int(pred.shape[1]), "per_step": steps}


def run_chunk_replay(o: ReplayOptions, wrist_image_topic: str | None = None,
                     proprio_topic: str | None = None) -> tuple[Path, dict]:
    check_options(o)
    bag, image_topic = _one(o.bag, "bag"), _one(o.image_topic, "--image-topic")
    out, tmp = check_out(o.out, bag, o.force)  # before any work: a refused output costs nothing
    ep = BagEpisode(bag, image_topic, o.instruction_topic, o.gt_action_topic,
                    need_instruction_topic=not o.instruction, twist_period_s=o.twist_period_s)
    if not o.instruction and not ep.instructions:
        raise ReplayError(f"instruction topic {ep.instruction_topic} has no messages; pass --instruction TEXT")
    wrist = _topic(ep, wrist_image_topic, IMAGE_TYPES, "wrist image")
    proprio = _topic(ep, proprio_topic, tuple(PROPRIO_TYPES), "proprio")
    if wrist and wrist == ep.image_topic:
        raise ReplayError(f"--wrist-image-topic {wrist} is the primary image topic too")
    from openvla_model import load_policy

    policy = load_policy(o.weights, o.backend, device=o.device, dtype=o.dtype, center_crop=o.center_crop,
                         default_unnorm_key=o.unnorm_key or None)
    try:
        _check_inputs(policy, wrist, proprio)
        create_incomplete(tmp, o.force, bag)
        try:
            with _Interrupt() as stop:
                records, info = _replay(ep, o, stop, policy, wrist, proprio)
            summary = _finalize(tmp, ep, o, records, info, stop.hit, wrist, proprio)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # ours: created exclusively above
            raise
    finally:
        policy.close()
    publish(tmp, out, o.force)
    return out, summary


def _check_inputs(policy, wrist: str | None, proprio: str | None) -> None:
    want = policy.spec.num_images_in_input
    if want is not None and want != (2 if wrist else 1):
        raise ReplayError(f"this checkpoint takes {want} image(s) per chunk: "
                          + ("pass --wrist-image-topic" if want == 2 else "it cannot use --wrist-image-topic"))
    if want is not None and want > 2:
        raise ReplayError(f"this checkpoint takes {want} images per chunk; the replay feeds at most 2 (primary, wrist)")
    if policy.uses_proprio and not proprio:
        raise ReplayError(f"this checkpoint takes the robot state ({policy.spec.proprio_dim} values): "
                          "pass --proprio-topic (sensor_msgs/JointState or std_msgs/Float64MultiArray)")
    if proprio and not policy.uses_proprio:
        raise ReplayError("this checkpoint has no proprio projector: --proprio-topic cannot be used")


def _replay(ep: BagEpisode, o: ReplayOptions, stop, policy, wrist: str | None, proprio: str | None):
    from openvla_model import OpenVLAError

    from ..image_conversion import msg_to_rgb
    from ..oft_inputs import proprio_from_msg

    spec = policy.spec
    T = spec.num_actions_chunk
    sel = FrameSelector(o.every, o.control_rate_hz, o.max_frames)
    wrist_f = _Follower(ep.messages({wrist}), lambda m: stamp_ns(m[4].header) or m[2]) if wrist else None
    ptype = PROPRIO_TYPES[ep.topics[proprio][0]] if proprio else None
    if ptype == "joint_state":
        proprio_f = _Follower(ep.messages({proprio}), lambda m: stamp_ns(m[4].header) or m[2])
    elif ptype:
        proprio_f = _Follower(ep.messages({proprio}), lambda m: m[2])  # no header: bag time
    else:
        proprio_f = None
    gts: list = []
    records: list = []
    done_times: list = []
    t_read = t_model = 0.0
    progress = Progress(expected_selected(ep, o), o.progress, "replay (OFT chunks)")
    clock = time.perf_counter
    t_start = clock()
    last_selected = None
    try:
        for frame in ep.frames():
            t0 = clock()
            if stop.hit:
                break
            instruction, gt = frame_inputs(ep, o, frame)
            gts.append(gt)
            if sel.full and (last_selected is None or frame.index >= last_selected + T - 1):
                break  # the last chunk's horizon is covered
            if not sel.accept(frame):
                continue
            last_selected = frame.index
            rec = {"frame": frame.index, "stamp_ns": frame.stamp_ns, "bag_time_ns": frame.bag_time_ns,
                   "instruction": instruction or "", "status": "ok"}
            records.append(rec)
            progress.update()
            if instruction is None:
                rec["status"] = "no_instruction"
                continue
            try:
                images = [msg_to_rgb(frame.msg, frame.msgtype.endswith("CompressedImage"), DEFAULT_MAX_PIXELS)]
                if wrist_f is not None:
                    w = wrist_f.at(frame.stamp_ns)
                    w_stamp = None if w is None else (stamp_ns(w[4].header) or w[2])
                    if w is None or frame.stamp_ns - w_stamp > WRIST_MAX_SKEW_S * 1e9:
                        raise ReplayError(f"no wrist image at most {WRIST_MAX_SKEW_S:g} s older than the frame")
                    images.append(msg_to_rgb(w[4], w[1].endswith("CompressedImage"), DEFAULT_MAX_PIXELS))
                state = None
                if proprio_f is not None:
                    limit = frame.stamp_ns if ptype == "joint_state" else frame.bag_time_ns
                    p = proprio_f.at(limit)
                    if p is None or limit - proprio_f.key(p) > PROPRIO_MAX_SKEW_S * 1e9:
                        raise ReplayError(f"no proprio message at most {PROPRIO_MAX_SKEW_S:g} s older than the frame")
                    state = proprio_from_msg(p[4], ptype, expected_dim=spec.proprio_dim)
                t1 = clock()
                t_read += t1 - t0
                chunk = policy.predict_chunk(images, instruction, proprio=state, unnorm_key=o.unnorm_key or None)
                t_model += clock() - t1
            except (ReplayError, OpenVLAError) as e:
                rec["status"] = f"rejected: {' '.join(str(e).split())}"
                continue
            rec.update(actions=chunk.actions, normalized=chunk.normalized, latency_ms=chunk.timings_ms["total"],
                       unnorm_key=chunk.unnorm_key, valid=chunk.valid)
            if not chunk.valid:
                rec["status"] = "rejected: invalid model output (non-finite values or out-of-range tokens)"
            done_times.append(clock() - t_start)
        wall = clock() - t_start
    finally:
        progress.close()
    for rec in records:  # step k against the GT of frame i + k
        i = rec["frame"]
        rec["gt"] = np.array([gts[i + k] if i + k < len(gts) and gts[i + k] is not None else [np.nan] * 7
                              for k in range(T)], dtype=np.float64)
    info = {"model": policy.describe(), "spec": {"num_actions_chunk": T, "action_dim": spec.action_dim,
                                                  "proprio_dim": spec.proprio_dim, "num_images": 2 if wrist else 1},
            "done_times_s": done_times,
            "timing_s": {"bag_read_decode": round(t_read, 4), "model": round(t_model, 4), "total": round(wall, 4)}}
    return records, info


def _finalize(out: Path, ep: BagEpisode, o: ReplayOptions, records: list, info: dict, partial: bool,
              wrist: str | None, proprio: str | None) -> dict:
    spec = info["spec"]
    T, D = spec["num_actions_chunk"], spec["action_dim"]
    done = [r for r in records if r["status"] == "ok"]
    pred = np.array([r["actions"] for r in done], dtype=np.float64).reshape(-1, T, D)
    gt = np.array([r["gt"] for r in done], dtype=np.float64).reshape(-1, T, 7)
    comparable = D == 7 and bool(np.isfinite(gt).any())
    errors = chunk_errors(pred, gt, o.gripper_threshold) if comparable else None
    latency = np.array([r["latency_ms"] for r in done], dtype=np.float64)
    lat = metrics.latency_stats(latency)
    done_t = np.array(info["done_times_s"], dtype=np.float64)
    summary = {
        "partial": bool(partial), "mode": "offline", "kind": "oft_chunks",
        "bag": {**ep.identity(), "wrist_image_topic": wrist, "proprio_topic": proprio},
        "model": info["model"], "chunk": spec,
        "instruction": o.instruction or f"from {ep.instruction_topic}",
        "unnorm_key": done[0]["unnorm_key"] if done else o.unnorm_key,
        "selection": {"every": o.every, "control_rate_hz": o.control_rate_hz, "max_frames": o.max_frames},
        "frames": {"in_bag": ep.num_frames, "selected": len(records), "expected_selected": expected_selected(ep, o),
                   "processed": len(done), "rejected": sum(r["status"].startswith("rejected") for r in records),
                   "dropped": 0, "no_instruction": sum(r["status"] == "no_instruction" for r in records)},
        "latency_ms": lat,  # per chunk (one forward pass)
        "per_action_ms_p50": None if lat["p50"] is None else lat["p50"] / T,
        "speculative": None,
        "achieved_rate_hz": metrics.achieved_rate(done_t),  # chunks per second
        "gripper_threshold": o.gripper_threshold,
        "errors_vs_gt": errors["per_step"][0]["dims"] if errors else None,  # step 0: what executes first
        "gripper_agreement": errors["per_step"][0]["gripper_agreement"] if errors else None,
        "chunk_errors": errors,
        "chunks_with_gt": int(np.isfinite(gt).any(axis=(1, 2)).sum()) if comparable else 0,
        "timing_s": info["timing_s"],
    }
    _write_csv(out / "chunks.csv", records, T, D)
    plots = _plots(out, records, errors, T, D, ep.num_frames, f"{ep.path.name}: OFT chunks vs ground truth")
    write_json(out / "summary.json", summary)
    _write_report(out, summary, plots)
    return summary


def _write_csv(path: Path, records: list, T: int, D: int) -> None:
    dims = list(DIMS) if D == 7 else [f"a{j}" for j in range(D)]
    cols = (["frame", "stamp_ns", "step", "target_frame", "instruction", "status"] + [f"pred_{d}" for d in dims]
            + [f"norm_{d}" for d in dims] + [f"gt_{d}" for d in DIMS] + ["latency_ms"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in records:
            if "actions" not in r:
                w.writerow([r["frame"], r["stamp_ns"], "", "", r["instruction"], r["status"]]
                           + [""] * (2 * D + 7) + [""])
                continue
            for k in range(T):
                w.writerow([r["frame"], r["stamp_ns"], k, r["frame"] + k, r["instruction"], r["status"]]
                           + [f"{v:.7g}" for v in r["actions"][k]] + [f"{v:.7g}" for v in r["normalized"][k]]
                           + [f"{v:.7g}" for v in r["gt"][k]] + [f"{r['latency_ms']:.3f}"])


def _plots(out: Path, records: list, errors: dict | None, T: int, D: int, n_frames: int, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    done = [r for r in records if "actions" in r]
    if errors:
        fig, axes = plt.subplots(7, 1, figsize=(8, 12), sharex=True)
        steps = np.arange(T)
        for d, ax in enumerate(axes):
            mae = [s["dims"][DIMS[d]]["mae"] for s in errors["per_step"]]
            ax.plot(steps, [np.nan if v is None else v for v in mae], "o-", ms=3)
            ax.set_ylabel(f"MAE {DIMS[d]}")
            ax.grid(alpha=0.3)
        axes[0].set_title(f"{title}: error per chunk step")
        axes[-1].set_xlabel("chunk step k (vs the ground truth of frame i + k)")
        fig.tight_layout()
        fig.savefig(out / "chunk_errors.png", dpi=80)
        plt.close(fig)
        files.append("chunk_errors.png")
    dims = min(D, 7)
    fig, axes = plt.subplots(dims, 1, figsize=(10, 1.8 * dims + 1), sharex=True, squeeze=False)
    for d, ax in enumerate(axes[:, 0]):
        for r in done:
            ax.plot(r["frame"] + np.arange(T), r["actions"][:, d], "-", lw=0.8, alpha=0.7)
        if done:
            frames = np.concatenate([r["frame"] + np.arange(T) for r in done])
            gt = np.concatenate([r["gt"][:, d] for r in done])
            ok = np.isfinite(gt)
            if ok.any():
                ax.plot(frames[ok], gt[ok], "k.", ms=3, label="ground truth")
        ax.set_ylabel(DIMS[d] if D == 7 else f"a{d}")
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(f"{title}: each chunk's steps (lines) and the ground truth (dots)")
    axes[-1, 0].set_xlabel(f"frame ({n_frames} in the bag)")
    fig.tight_layout()
    fig.savefig(out / "chunk_actions.png", dpi=80)
    plt.close(fig)
    files.append("chunk_actions.png")
    return files


def _fmt(v, nd=4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else (
        f"{v:.{nd}g}" if isinstance(v, float) else str(v))


def _write_report(out: Path, summary: dict, plots: list[str]) -> None:
    b, f, c, lat = summary["bag"], summary["frames"], summary["chunk"], summary["latency_ms"]
    m = summary["model"]
    lines = [f"# OpenVLA-OFT chunk replay report{' (PARTIAL: stopped early)' if summary['partial'] else ''}", "",
             f"- bag: `{b['path']}` ({b['storage']}, {b['duration_s']:.1f} s), images `{b['image_topic']}`, wrist "
             f"`{b['wrist_image_topic'] or '-'}`, proprio `{b['proprio_topic'] or '-'}`",
             f"- model: `{m.get('weights_path')}` on {m.get('backend')} {m.get('device', '')} {m.get('dtype', '')}; "
             f"chunk {c['num_actions_chunk']} x {c['action_dim']}, {c['num_images']} image(s), proprio "
             f"{c['proprio_dim'] or 'none'}",
             f"- frames: {f['processed']} chunks from {f['selected']} selected frames ({f['in_bag']} in bag); "
             f"rejected {f['rejected']}, without instruction {f['no_instruction']}",
             f"- model time per chunk ms: p50 {_fmt(lat['p50'])}, p95 {_fmt(lat['p95'])}, max {_fmt(lat['max'])}; "
             f"per action (p50 / {c['num_actions_chunk']}) {_fmt(summary['per_action_ms_p50'])}", ""]
    ce = summary["chunk_errors"]
    if ce:
        lines += [f"Error of chunk step k against the ground truth of frame i + k (MAE per dimension, over "
                  f"{ce['chunks']} chunks; steps past the end of the bag left out):", "",
                  "| step | n | " + " | ".join(DIMS) + " | mean | gripper agreement |",
                  "|---" * (len(DIMS) + 4) + "|"]
        for s in ce["per_step"]:
            lines.append(f"| {s['step']} | {s['n']} | " + " | ".join(_fmt(s["dims"][d]["mae"]) for d in DIMS)
                         + f" | {_fmt(s['mae_mean'])} | {_fmt(s['gripper_agreement'], 3)} |")
        lines.append("")
    else:
        lines += ["No ground truth comparable with the chunks (none in the bag, or action_dim != 7): "
                  "predictions only.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    body, in_table = [], False
    for ln in lines:
        if ln.startswith("|"):
            if ln.startswith("|---"):
                continue
            if not in_table:
                body.append("<table border=1 cellpadding=4>")
                in_table = True
            cells = [c.strip() for c in ln.strip("|").split("|")]
            body.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if ln.startswith("# "):
            body.append(f"<h1>{html.escape(ln[2:])}</h1>")
        elif ln and not ln.startswith("!["):
            body.append(f"<p>{html.escape(ln.lstrip('- '))}</p>")
    if in_table:
        body.append("</table>")
    imgs = "\n".join(f'<img src="{p}" alt="{p}" style="max-width:100%">' for p in plots)
    (out / "index.html").write_text("<!doctype html><meta charset='utf-8'><title>OpenVLA-OFT replay</title>\n"
                                    + "\n".join(body) + "\n" + imgs + "\n", encoding="utf-8")
