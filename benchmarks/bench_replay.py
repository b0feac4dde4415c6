"""Offline replay speed: N frames of 640x480 rgb8 from a sqlite3 bag through the tiny model.
Prints the split between reading + decoding the bag and model time (target: bag <= 10%).

    .venv/bin/python benchmarks/bench_replay.py [--frames 1000] [--storage sqlite3|mcap]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--storage", default="sqlite3", choices=["sqlite3", "mcap"])
    args = p.parse_args()
    from replay_bags import write_episode

    from openvla_model.tiny_checkpoint import write_tiny_checkpoint
    from openvla_ros.replay.options import ReplayOptions
    from openvla_ros.replay.run import run_replay

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        weights = write_tiny_checkpoint(d / "tiny")
        t0 = time.perf_counter()
        bag = write_episode(d / "bag", n_frames=args.frames, storage=args.storage, size=(480, 640), gt="float64")
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        out, s = run_replay(ReplayOptions(bag=str(bag), weights=str(weights), device="cpu", dtype="float32",
                                          unnorm_key="bridge_orig", out=str(d / "out"), progress=False))
        wall = time.perf_counter() - t0
    t = s["timing_s"]
    res = {"frames": s["frames"]["processed"], "storage": args.storage, "bag_write_s": round(t_write, 2),
           "replay_wall_s": round(wall, 2), "loop_s": t["total"], "bag_read_decode_s": t["bag_read_decode"],
           "model_s": t["model"], "bag_share": round(t["bag_read_decode"] / t["total"], 4),
           "per_frame_model_ms": round(1e3 * t["model"] / max(1, s["frames"]["processed"]), 2),
           "machine": f"{platform.machine()} {platform.processor() or ''} cores={__import__('os').cpu_count()}"}
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
