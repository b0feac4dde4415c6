"""openvla-replay: replay a recorded episode through the policy (offline) or the running node
(live) and write a report; several bags (or image topics): one report per stream (offline:
batched; live: into the node's streams at once). Errors: one clear line, exit 2. Ctrl-C: partial report, exit 130."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="openvla-replay", description=__doc__.split("\n")[0])
    p.add_argument("bag", nargs="+", help="rosbag2 folder (sqlite3 or mcap) or a single .db3/.mcap file; "
                   "several bags: one stream each, replayed batched (offline) or into the node's streams (live)")
    p.add_argument("--image-topic", action="append", default=None,
                   help="sensor_msgs/Image or CompressedImage topic (default: the only one); repeat it for several "
                        "streams from one bag, or give one per bag")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--instruction-topic", help="std_msgs/String topic (default: the only one)")
    g.add_argument("--instruction", help="use this instruction for every frame")
    p.add_argument("--gt-action-topic", help="ground truth: openvla_ros/msg/EndEffectorAction, "
                   "geometry_msgs/TwistStamped or std_msgs/Float64MultiArray (7 values); default: the only one")
    p.add_argument("--wrist-image-topic", help="OpenVLA-OFT checkpoints taking 2 images: the wrist camera topic")
    p.add_argument("--proprio-topic", help="OpenVLA-OFT checkpoints with proprio: sensor_msgs/JointState or "
                   "std_msgs/Float64MultiArray robot-state topic (docs/oft.md)")
    p.add_argument("--weights", default=os.environ.get("OPENVLA_WEIGHTS"), help="default: $OPENVLA_WEIGHTS")
    p.add_argument("--backend", default="torch", choices=["torch", "ttnn"])
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--mesh-device", default=os.environ.get("MESH_DEVICE"))
    p.add_argument("--unnorm-key", default=None)
    p.add_argument("--center-crop", action="store_true")
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=True,
                   help="offline: speculative action decoding, the previous action's tokens verified as a draft "
                        "(same actions; the report shows how many were accepted)")
    p.add_argument("--speculative-max-age-s", type=float, default=1.0,
                   help="offline: no draft from an action older than this (by image stamps)")
    p.add_argument("--mode", default="offline", choices=["offline", "live"])
    p.add_argument("--rate", type=float, default=1.0, help="live: playback speed factor")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--every", type=int, default=1, help="use every Nth image")
    sel.add_argument("--control-rate-hz", type=float, default=None, help="use the first image of each control tick")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--out", default=None, help="output folder (default: ./<bag>_openvla_replay)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--gripper-threshold", type=float, default=0.5)
    p.add_argument("--twist-period-s", type=float, default=0.2,
                   help="TwistStamped ground truth: velocity x period = the per-step delta")
    p.add_argument("--gt-tolerance-s", type=float, default=0.05)
    p.add_argument("--bag-version", type=int, default=8, choices=[8, 9],
                   help="output bag format (8: readable by Humble and Jazzy)")
    p.add_argument("--node-image-topic", default="image", help="live: the node's image topic")
    p.add_argument("--node-instruction-topic", default="instruction", help="live: the node's instruction topic")
    p.add_argument("--node-action-topic", default="action_preview",
                   help="live: the node's topic to record (action_preview: every action that passed the safety "
                        "checks, also while motion is disabled)")
    p.add_argument("--node-streams", default=None, metavar="NAME,NAME,...",
                   help="live: the node's stream names (its `streams` parameter) the replayed streams are played "
                        "into, in order (default: several streams use their own names, one stream the plain topics); "
                        "stream i publishes <namespace>/<name_i>/<node topic>")
    p.add_argument("--node-namespace", default=None,
                   help="live: the node's namespace, prefixed to the relative node topics (default: the player's)")
    p.add_argument("--wait-timeout-s", type=float, default=60.0, help="live: wait this long for the node")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s: %(message)s")
    from openvla_model import OpenVLAError

    from .bag import ReplayError
    from .options import ReplayOptions
    from .run import run_replay

    if args.mode == "offline" and not args.weights:
        print("error: no --weights given and OPENVLA_WEIGHTS is not set", file=sys.stderr)
        return 2
    opts = ReplayOptions(
        bag=args.bag[0] if len(args.bag) == 1 else args.bag,
        image_topic=args.image_topic[0] if args.image_topic and len(args.image_topic) == 1 else args.image_topic,
        instruction_topic=args.instruction_topic,
        instruction=args.instruction, gt_action_topic=args.gt_action_topic, weights=args.weights,
        backend=args.backend, device=args.device, dtype=args.dtype, mesh_device=args.mesh_device,
        unnorm_key=args.unnorm_key, center_crop=args.center_crop, speculative=args.speculative,
        speculative_max_age_s=args.speculative_max_age_s, mode=args.mode, rate=args.rate, every=args.every,
        control_rate_hz=args.control_rate_hz, max_frames=args.max_frames, out=args.out, force=args.force,
        gripper_threshold=args.gripper_threshold, twist_period_s=args.twist_period_s,
        gt_tolerance_s=args.gt_tolerance_s, bag_version=args.bag_version, progress=not args.quiet,
        node_image_topic=args.node_image_topic, node_instruction_topic=args.node_instruction_topic,
        node_action_topic=args.node_action_topic, node_streams=args.node_streams,
        node_namespace=args.node_namespace, wait_timeout_s=args.wait_timeout_s)
    try:
        from .chunks import chunk_replay_wanted, run_chunk_replay  # OpenVLA-OFT: chunk metrics (docs/oft.md)

        if chunk_replay_wanted(opts, args.wrist_image_topic, args.proprio_topic):
            out, summary = run_chunk_replay(opts, args.wrist_image_topic, args.proprio_topic)
        else:
            out, summary = run_replay(opts)
    except (ReplayError, OpenVLAError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message holds
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if "streams" in summary:  # several streams
        st, b = summary["streams"], summary["batch"]
        n = sum(s["frames"]["processed"] for s in st.values())
        how = f"{n} actions in {b['batches']} batches" if summary["mode"] == "offline" else \
            f"{n} actions, {sum(s['frames']['dropped'] for s in st.values())} dropped"
        print(f"{'PARTIAL ' if summary['partial'] else ''}report: {out}/report.md  ({len(st)} streams, {how}; "
              f"per stream: {out}/<stream>/report.md)")
        return 130 if summary["partial"] else 0
    f, sp = summary["frames"], summary.get("speculative")
    spec = f"; draft tokens accepted: {sp['mean_accepted']:.2f} of 6 per drafted action" \
        if sp and sp["mean_accepted"] is not None else ""
    print(f"{'PARTIAL ' if summary['partial'] else ''}report: {out}/report.md  "
          f"({f['processed']} actions from {f['selected']} frames; p50 latency "
          f"{summary['latency_ms']['p50'] or float('nan'):.1f} ms{spec})")
    return 130 if summary["partial"] else 0


if __name__ == "__main__":
    sys.exit(main())
