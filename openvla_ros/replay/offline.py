"""Offline replay: every selected image of the bag through the policy API (no ROS graph).

Several streams (bags, or image topics of one bag) are replayed together: each round takes the
next selected frame of every stream that has one and runs them as one `policy.predict_batch`;
a stream that has ended leaves the batch, which shrinks. predict_batch gives every item exactly
the action predict() gives it alone, and each stream keeps its own draft state, so each
stream's rows are those of its single-stream replay (the latency is the batch's)."""
from __future__ import annotations

import time

from openvla_model import OpenVLAError, load_policy
from openvla_model.policy import BatchItem
from openvla_model.speculative import AcceptanceStats, DraftState

from ..image_conversion import ImageConversionError, msg_to_rgb
from .frames import Progress, expected_selected, frame_inputs, select_frames


def frame_to_rgb(frame):
    return msg_to_rgb(frame.msg, frame.msgtype.endswith("CompressedImage"))


class _Stream:
    """One episode's replay state: its frame iterator, draft state, rows and timings."""

    def __init__(self, ep, o):
        self.ep = ep
        self.frames = select_frames(ep.frames(), o.every, o.control_rate_hz, o.max_frames)
        # The last valid action's tokens are the next frame's draft (same instruction, at most
        # speculative_max_age_s older by image stamps), as in the node; drafts never cross streams.
        self.drafts, self.acceptance = DraftState(o.speculative_max_age_s), AcceptanceStats()
        self.rows: list = []
        self.done_times: list = []
        self.t_read = self.t_model = 0.0
        self.ended = False

    def next_row(self, o, unnorm_key: str, use_drafts: bool):
        """The next selected frame -> (row, BatchItem or None when there is nothing to predict),
        or None at the end of the episode. Reading and converting the frame count as t_read."""
        t0 = time.perf_counter()
        frame = next(self.frames, None)
        if frame is None:
            self.ended = True
            return None
        instruction, gt = frame_inputs(self.ep, o, frame)
        row = {"frame": frame.index, "stamp_ns": frame.stamp_ns, "bag_time_ns": frame.bag_time_ns,
               "instruction": instruction or "", "gt": gt, "status": "ok"}
        item = None
        if instruction is None:
            row["status"] = "no_instruction"
        else:
            try:
                rgb = frame_to_rgb(frame)
            except ImageConversionError as e:
                self.drafts.reset()
                row["status"] = f"rejected: {e}"
            else:
                draft = self.drafts.draft(instruction, now=frame.stamp_ns / 1e9) if use_drafts else None
                item = BatchItem(rgb, instruction, unnorm_key, draft)
        self.t_read += time.perf_counter() - t0
        return row, item

    def record(self, row: dict, item: BatchItem, r, unnorm_key: str, done_at: float) -> None:
        """The outcome of this stream's item: an ActionResult or the OpenVLAError it failed with."""
        if isinstance(r, OpenVLAError):
            self.drafts.reset()
            row["status"] = f"rejected: {r}"
            return
        self.acceptance.record(item.draft is not None, getattr(r, "accepted", 0))
        if r.valid:
            self.drafts.update(item.instruction, r.tokens, now=row["stamp_ns"] / 1e9)
        else:  # out-of-range tokens never become a draft
            self.drafts.reset()
        row.update(action=r.action, normalized=r.normalized, tokens=r.tokens,
                   accepted=int(getattr(r, "accepted", 0)) if item.draft is not None else None,
                   out_of_range=int(r.out_of_range.sum()), latency_ms=r.timings_ms["total"],
                   inference_ms=r.timings_ms["total"], unnorm_key=unnorm_key, sequence=len(self.rows))
        self.done_times.append(done_at)


def run_offline(ep, o, stop) -> tuple[list, dict]:
    """One stream: (rows, info)."""
    results, _ = run_offline_streams([ep], o, stop)
    return results[0]


def run_offline_streams(eps: list, o, stop) -> tuple[list, dict]:
    """Several streams, batched: ([(rows, info) per stream], batch info)."""
    policy = load_policy(o.weights, backend=o.backend, device=o.device, dtype=o.dtype, mesh_device=o.mesh_device,
                         center_crop=o.center_crop, default_unnorm_key=o.unnorm_key or None,
                         speculative=o.speculative)
    # Backends without draft rows decode plainly: no drafts offered, none counted.
    use_drafts = bool(o.speculative and getattr(policy, "speculative", False)
                      and getattr(getattr(policy, "backend", None), "supports_draft", True) is not False)
    streams = [_Stream(ep, o) for ep in eps]
    sizes: list[int] = []  # items per predict_batch call
    clock = time.perf_counter
    progress = Progress(None, o.progress, "replay")
    try:
        unnorm_key = policy.codec.resolve_key(o.unnorm_key or None)
        expected = [expected_selected(ep, o) for ep in eps]
        progress.total = None if None in expected else sum(expected)
        t_start = clock()
        while not stop.hit:
            pending = []  # (stream, row, item or None): the next selected frame of every stream that has one
            for s in streams:
                nxt = None if s.ended else s.next_row(o, unnorm_key, use_drafts)
                if nxt is not None:
                    pending.append((s, *nxt))
            if not pending:
                break
            batch = [(s, row, item) for s, row, item in pending if item is not None]
            if batch:
                t1 = clock()
                try:
                    outcomes = policy.predict_batch([item for _, _, item in batch])
                except OpenVLAError as e:  # not one item's fault (e.g. the backend): the whole batch
                    outcomes = [e] * len(batch)
                t2 = clock()
                sizes.append(len(batch))
                for (s, row, item), r in zip(batch, outcomes):
                    s.record(row, item, r, unnorm_key, t2 - t_start)
                    s.t_model += t2 - t1
            for s, row, _ in pending:
                s.rows.append(row)
                progress.update()
        wall = clock() - t_start
    finally:
        progress.close()
        model_info = policy.describe()
        batched = hasattr(policy.backend, "generate_batch")
        policy.close()
    results = []
    for s in streams:
        speculative = {"enabled": use_drafts, "max_age_s": o.speculative_max_age_s, **s.acceptance.as_dict()}
        results.append((s.rows, {
            "model": model_info, "unnorm_key": unnorm_key, "selected": len(s.rows), "done_times_s": s.done_times,
            "speculative": speculative,
            "timing_s": {"bag_read_decode": round(s.t_read, 4), "model": round(s.t_model, 4),
                         "total": round(wall, 4)}}))
    hist: dict = {}
    for n in sizes:
        hist[n] = hist.get(n, 0) + 1
    batch_info = {"batches": len(sizes), "items": int(sum(sizes)),
                  "mean_size": round(sum(sizes) / len(sizes), 3) if sizes else None,
                  "sizes": {str(k): v for k, v in sorted(hist.items())},
                  "batched_backend": batched}  # False: predict_batch ran one generate per item
    return results, batch_info
