"""Benchmark of the ROS layer (not a test: it prints numbers; record them in docs/ros_node.md).

1. Image message -> model input: sensor_msgs/Image 640x480 (rgb8, bgr8, rgb8 with row padding,
   bayer_rggb8, yuv422, rgb16, JPEG and PNG CompressedImage) -> RGB array
   (openvla_ros.image_conversion), then -> the (1, 6, 224, 224) float32 model input (the model's
   one Preprocessor). Target: <= 3 ms per frame. Also: the time to refuse a JPEG decompression
   bomb (~700 bytes declaring 20000x20000; refused from its header).
2. Node overhead beyond model time: openvla_node as a separate process on the tiny checkpoint
   (CPU), fed one 640x480 rgb8 frame at a time over DDS (loopback, shared memory); for each
   action: model time (inference_ms), node latency (image stamp -> action publication,
   latency_ms) and round trip at the sender. Overhead = latency_ms - inference_ms, which includes
   the image's DDS transport, the hand-over to the worker, conversion, safety and publishing.
   Target: <= 5% of model time at the tiny model's rate.

Run (DDS on loopback):
    scripts/run_isolated.sh .venv/bin/python benchmarks/bench_ros_layer.py [--frames 60] [--json] [--conversion-only]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("FASTRTPS_DEFAULT_PROFILES_FILE", str(ROOT / "config" / "dds" / "fastdds_loopback.xml"))
os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(ROOT / "config" / "dds" / "fastdds_loopback.xml"))
os.environ.setdefault("ROS_DOMAIN_ID", str(150 + os.getpid() % 50))


def timeit(fn, repeat: int, warmup: int = 5) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return {"p50_ms": statistics.median(samples), "p95_ms": float(np.percentile(samples, 95)),
            "mean_ms": statistics.fmean(samples)}


def bench_conversion(weights: Path, repeat: int) -> dict:
    import torch

    from openvla_model import load_policy
    from openvla_model.synthetic import synthetic_rgb

    from openvla_ros.image_conversion import (compressed_msg_to_rgb, image_msg_to_rgb, rgb_to_compressed_msg,
                                              rgb_to_image_msg)

    rgb = synthetic_rgb(seed=1, height=480, width=640)
    policy = load_policy(weights, backend="torch", device="cpu", dtype="float32")
    pre = policy.preprocessor  # the model's one preprocessing implementation
    out = {"torch_threads": torch.get_num_threads()}
    cases = {"rgb8": rgb_to_image_msg(rgb, "rgb8"), "bgr8": rgb_to_image_msg(rgb, "bgr8"),
             "rgb8_padded_step": rgb_to_image_msg(rgb, "rgb8", row_padding=64),
             "bayer_rggb8": rgb_to_image_msg(rgb, "bayer_rggb8"), "yuv422": rgb_to_image_msg(rgb, "yuv422"),
             "rgb16": rgb_to_image_msg(rgb, "rgb16"),
             "jpeg": rgb_to_compressed_msg(rgb, "jpeg"), "png": rgb_to_compressed_msg(rgb, "png")}
    for name, msg in cases.items():
        conv = compressed_msg_to_rgb if name in COMPRESSED else image_msg_to_rgb
        n = repeat if name != "png" else max(10, repeat // 10)  # PNG decoding is ~10x slower
        out[f"{name}_to_rgb"] = timeit(lambda: conv(msg), n)
        out[f"{name}_to_model_input"] = timeit(lambda: pre(conv(msg)), n)
    shape = tuple(pre(image_msg_to_rgb(cases["rgb8"])).shape)
    policy.close()
    out["model_input_shape"] = shape
    out["jpeg_bomb_refusal"] = timeit(lambda: _refuse(compressed_msg_to_rgb, _jpeg_bomb(rgb)), repeat)
    return out


COMPRESSED = ("jpeg", "png")
CASES = ("rgb8", "bgr8", "rgb8_padded_step", "bayer_rggb8", "yuv422", "rgb16", "jpeg", "png")


def _jpeg_bomb(rgb):
    """A small JPEG whose SOF0 header declares 20000x20000 pixels."""
    import struct

    from openvla_ros.image_conversion import rgb_to_compressed_msg

    msg = rgb_to_compressed_msg(rgb[:16, :16].copy(), "jpeg")
    data = bytearray(msg.data)
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 20000, 20000)
    msg.data = bytes(data)
    return msg


def _refuse(conv, msg):
    from openvla_ros.image_conversion import ImageConversionError

    try:
        conv(msg)
    except ImageConversionError:
        return
    raise AssertionError("the bomb was not refused")


def bench_node(weights: Path, frames: int, timeout_s: float = 60.0) -> dict:
    import rclpy
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from openvla_model.synthetic import synthetic_rgb

    from openvla_ros.image_conversion import rgb_to_image_msg
    from openvla_ros.msg import EndEffectorAction

    cmd = [sys.executable, "-m", "openvla_ros.node", "--ros-args", "-r", "__ns:=/bench",
           "-p", "backend:=torch", "-p", "device:=cpu", "-p", f"weights_path:={weights}",
           "-p", "unnorm_key:=bridge_orig", "-p", "start_enabled:=true", "-p", "initial_instruction:=pick up the cup",
           "--log-level", "warn"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    rclpy.init()
    node = Node("bench_ros_layer", namespace="/bench")
    received: dict = {}
    node.create_subscription(EndEffectorAction, "action",
                             lambda m: received.__setitem__((m.header.stamp.sec, m.header.stamp.nanosec),
                                                            (time.perf_counter(), m)), QoSProfile(depth=50))
    pub = node.create_publisher(Image, "image", qos_profile_sensor_data)
    node.create_publisher(String, "instruction", 10)
    msgs = [rgb_to_image_msg(synthetic_rgb(seed=s, height=480, width=640), "rgb8") for s in range(4)]
    rows = []
    try:
        deadline = time.monotonic() + timeout_s
        while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
        if pub.get_subscription_count() == 0:
            raise RuntimeError("openvla_node did not subscribe to /bench/image")
        for i in range(frames + 5):  # the first 5 warm up
            msg = msgs[i % len(msgs)]
            msg.header.stamp = node.get_clock().now().to_msg()
            key = (msg.header.stamp.sec, msg.header.stamp.nanosec)
            t_send = time.perf_counter()
            pub.publish(msg)
            t_end = time.monotonic() + 10.0
            while key not in received and time.monotonic() < t_end:
                rclpy.spin_once(node, timeout_sec=0.01)
            if key not in received:
                if time.monotonic() > deadline + 120:
                    raise RuntimeError("no actions from openvla_node")
                continue  # model still configuring, or a lost frame: send the next one
            t_recv, action = received[key]
            if i >= 5:
                rows.append({"model_ms": action.inference_ms, "node_latency_ms": action.latency_ms,
                             "round_trip_ms": (t_recv - t_send) * 1e3})
            time.sleep(0.02)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    model = [r["model_ms"] for r in rows]
    overhead = [r["node_latency_ms"] - r["model_ms"] for r in rows]
    rtt_overhead = [r["round_trip_ms"] - r["model_ms"] for r in rows]
    med = statistics.median
    return {"frames": len(rows), "model_ms_p50": med(model),
            "node_overhead_ms_p50": med(overhead), "node_overhead_ms_p95": float(np.percentile(overhead, 95)),
            "node_overhead_pct_of_model_p50": 100 * med(overhead) / med(model),
            "round_trip_overhead_ms_p50": med(rtt_overhead),
            "round_trip_overhead_pct_of_model_p50": 100 * med(rtt_overhead) / med(model),
            "node_exit_code": proc.returncode}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="checkpoint dir (default: a fresh tiny random one)")
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--repeat", type=int, default=200)
    p.add_argument("--json", action="store_true")
    p.add_argument("--conversion-only", action="store_true", help="skip part 2 (the node process)")
    args = p.parse_args(argv)
    if args.weights:
        weights = Path(args.weights)
    else:
        from openvla_model.tiny_checkpoint import write_tiny_checkpoint

        weights = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="bench_tiny_")), seed=0)
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
              "conversion": bench_conversion(weights, args.repeat),
              "node": None if args.conversion_only else bench_node(weights, args.frames)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    c, n = result["conversion"], result["node"]
    print(f"machine: {result['machine']}, torch threads {c['torch_threads']}, model input {c['model_input_shape']}")
    print("1. image message (640x480) -> RGB array -> model input tensor   [p50 / p95 ms]")
    for name in CASES:
        a, b = c[f"{name}_to_rgb"], c[f"{name}_to_model_input"]
        print(f"   {name:<17} to RGB {a['p50_ms']:7.3f} / {a['p95_ms']:7.3f}    to model input "
              f"{b['p50_ms']:7.3f} / {b['p95_ms']:7.3f}")
    bomb = c["jpeg_bomb_refusal"]
    print(f"   JPEG bomb (header says 20000x20000) refused in {bomb['p50_ms']:.3f} / {bomb['p95_ms']:.3f}")
    if n is None:
        return 0
    print(f"2. node overhead beyond model time, tiny model, {n['frames']} frames (p50):")
    print(f"   model {n['model_ms_p50']:.2f} ms; node overhead (stamp -> publish, minus model) "
          f"{n['node_overhead_ms_p50']:.2f} ms = {n['node_overhead_pct_of_model_p50']:.1f}% "
          f"(p95 {n['node_overhead_ms_p95']:.2f} ms); sender round trip minus model "
          f"{n['round_trip_overhead_ms_p50']:.2f} ms = {n['round_trip_overhead_pct_of_model_p50']:.1f}%")
    print(f"   node exit code {n['node_exit_code']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
