"""openvla_demo: the node pipeline end to end without `ros2 launch` (what launch/openvla_demo.launch.py
starts): synthetic camera + instruction -> openvla_node (tiny model, CPU) -> printed actions.

It starts the two node executables as child processes (the same entry points `ros2 run` uses),
listens on `action` until --count actions arrived, then stops both with SIGINT and checks that
they exited cleanly. Exit status 0 = actions received and clean shutdown.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def node_commands(weights: str, instruction: str, rate_hz: float, backend: str, device: str, unnorm_key: str):
    py = sys.executable
    camera = [py, "-m", "openvla_ros.synthetic_camera", "--ros-args", "-r", "__node:=synthetic_camera",
              "-p", f"rate_hz:={rate_hz}", "-p", f"instruction:={instruction}", "--log-level", "warn"]
    node = [py, "-m", "openvla_ros.node", "--ros-args", "-r", "__node:=openvla_node",
            "-p", f"backend:={backend}", "-p", f"device:={device}", "-p", f"weights_path:={weights}",
            "-p", f"unnorm_key:={unnorm_key}", "-p", "start_enabled:=true",
            "-p", "publish_twist:=true", "-p", "publish_gripper:=true"]
    return camera, node


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="openvla_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=os.environ.get("OPENVLA_WEIGHTS"),
                   help="checkpoint directory (default: $OPENVLA_WEIGHTS); `make demo` uses the tiny random one")
    p.add_argument("--instruction", default="pick up the red cup")
    p.add_argument("--unnorm-key", default="bridge_orig")
    p.add_argument("--backend", default="torch", choices=["torch", "ttnn"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rate-hz", type=float, default=5.0, help="synthetic camera rate")
    p.add_argument("--count", type=int, default=5, help="actions to print before stopping")
    p.add_argument("--timeout", type=float, default=25.0, help="give up after this many seconds")
    args = p.parse_args(argv)
    if not args.weights:
        print("error: no --weights given and OPENVLA_WEIGHTS is not set", file=sys.stderr)
        return 2

    import rclpy
    from rclpy.node import Node
    from rclpy.signals import SignalHandlerOptions

    from openvla_ros.msg import EndEffectorAction

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    camera_cmd, node_cmd = node_commands(args.weights, args.instruction, args.rate_hz, args.backend,
                                         args.device, args.unnorm_key)
    procs = {"synthetic_camera": subprocess.Popen(camera_cmd, env=env),
             "openvla_node": subprocess.Popen(node_cmd, env=env)}
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    received = []
    start = time.monotonic()
    try:
        listener = Node("openvla_demo_listener")

        def on_action(msg):
            received.append(msg)
            if len(received) <= args.count:
                print(f"action #{msg.sequence:<3} stamp {msg.header.stamp.sec}.{msg.header.stamp.nanosec:09d} "
                      f"frame {msg.header.frame_id!r}: d_pos [{msg.delta_position.x:+.4f} {msg.delta_position.y:+.4f} "
                      f"{msg.delta_position.z:+.4f}] m, d_rot [{msg.delta_orientation.x:+.4f} "
                      f"{msg.delta_orientation.y:+.4f} {msg.delta_orientation.z:+.4f}] rad, gripper {msg.gripper:.3f} "
                      f"(raw {msg.gripper_raw:+.3f}), tokens {list(msg.tokens)}, model {msg.inference_ms:.0f} ms, "
                      f"latency {msg.latency_ms:.0f} ms", flush=True)

        listener.create_subscription(EndEffectorAction, "action", on_action, 10)
        while len(received) < args.count and time.monotonic() - start < args.timeout:
            rclpy.spin_once(listener, timeout_sec=0.1)
            dead = [n for n, pr in procs.items() if pr.poll() is not None]
            if dead:
                print(f"error: {', '.join(dead)} exited early", file=sys.stderr)
                break
        listener.destroy_node()
    finally:
        rclpy.try_shutdown()
        for pr in procs.values():
            if pr.poll() is None:
                pr.send_signal(signal.SIGINT)
        codes = {}
        for name, pr in procs.items():
            try:
                codes[name] = pr.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pr.kill()
                codes[name] = pr.wait()
    ok = len(received) >= args.count and all(c == 0 for c in codes.values())
    print(f"received {min(len(received), args.count)}/{args.count} actions in {time.monotonic() - start:.1f} s; "
          f"exit codes {codes}; {'OK' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
