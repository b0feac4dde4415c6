"""Offline replay: every selected image of the bag through the policy API (no ROS graph)."""
from __future__ import annotations

import time

from openvla_model import OpenVLAError, load_policy
from openvla_model.speculative import AcceptanceStats, DraftState

from ..image_conversion import ImageConversionError, compressed_msg_to_rgb, image_msg_to_rgb
from .frames import Progress, expected_selected, frame_inputs, select_frames


def frame_to_rgb(frame):
    if frame.msgtype.endswith("CompressedImage"):
        return compressed_msg_to_rgb(frame.msg)
    return image_msg_to_rgb(frame.msg)


def run_offline(ep, o, stop) -> tuple[list, dict]:
    policy = load_policy(o.weights, backend=o.backend, device=o.device, dtype=o.dtype, mesh_device=o.mesh_device,
                         center_crop=o.center_crop, default_unnorm_key=o.unnorm_key or None,
                         speculative=o.speculative)
    # One episode, one stream: the last valid action's tokens are the next frame's draft (same
    # instruction, at most speculative_max_age_s older by image stamps), as in the node.
    # Backends without draft rows (TT-NN for now) decode plainly: no drafts offered, none counted.
    use_drafts = bool(o.speculative and getattr(policy, "speculative", False)
                      and getattr(getattr(policy, "backend", None), "supports_draft", True) is not False)
    drafts, acceptance = DraftState(o.speculative_max_age_s), AcceptanceStats()
    rows, done_times = [], []
    t_read = t_model = 0.0
    progress = Progress(None, o.progress, "replay")
    try:
        unnorm_key = policy.codec.resolve_key(o.unnorm_key or None)
        frames = select_frames(ep.frames(), o.every, o.control_rate_hz, o.max_frames)
        progress.total = expected_selected(ep, o)
        t_start = time.perf_counter()
        while not stop.hit:
            t0 = time.perf_counter()
            frame = next(frames, None)
            if frame is None:
                break
            instruction, gt = frame_inputs(ep, o, frame)
            row = {"frame": frame.index, "stamp_ns": frame.stamp_ns, "bag_time_ns": frame.bag_time_ns,
                   "instruction": instruction or "", "gt": gt, "status": "ok"}
            try:
                rgb = frame_to_rgb(frame) if instruction else None
                t1 = time.perf_counter()
                t_read += t1 - t0
                if instruction is None:
                    row["status"] = "no_instruction"
                else:
                    stamp_s = frame.stamp_ns / 1e9
                    draft = drafts.draft(instruction, now=stamp_s) if use_drafts else None
                    r = policy.predict(rgb, instruction, unnorm_key) if draft is None else \
                        policy.predict(rgb, instruction, unnorm_key, draft=draft)
                    acceptance.record(draft is not None, getattr(r, "accepted", 0))
                    if r.valid:
                        drafts.update(instruction, r.tokens, now=stamp_s)
                    else:  # out-of-range tokens never become a draft
                        drafts.reset()
                    row.update(action=r.action, normalized=r.normalized, tokens=r.tokens,
                               accepted=int(getattr(r, "accepted", 0)) if draft is not None else None,
                               out_of_range=int(r.out_of_range.sum()), latency_ms=r.timings_ms["total"],
                               inference_ms=r.timings_ms["total"], unnorm_key=unnorm_key, sequence=len(rows))
                    done_times.append(time.perf_counter() - t_start)
                t_model += time.perf_counter() - t1
            except (ImageConversionError, OpenVLAError) as e:
                drafts.reset()
                row["status"] = f"rejected: {e}"
            rows.append(row)
            progress.update()
        wall = time.perf_counter() - t_start
    finally:
        progress.close()
        model_info = policy.describe()
        policy.close()
    speculative = {"enabled": use_drafts, "max_age_s": o.speculative_max_age_s, **acceptance.as_dict()}
    return rows, {"model": model_info, "unnorm_key": unnorm_key, "selected": len(rows), "done_times_s": done_times,
                  "speculative": speculative,
                  "timing_s": {"bag_read_decode": round(t_read, 4), "model": round(t_model, 4), "total": round(wall, 4)}}
