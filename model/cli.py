"""Console scripts: openvla-predict, openvla-tiny-checkpoint. Errors: one clear line, exit 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def read_rgb(path: str):
    import cv2

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode image: {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def predict_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="openvla-predict", description="Run OpenVLA once on an image.")
    p.add_argument("--weights", default=os.environ.get("OPENVLA_WEIGHTS"),
                   help="weights directory in the HF openvla-7b layout (default: $OPENVLA_WEIGHTS)")
    p.add_argument("--image", required=True, help="image file (PNG/JPEG/...)")
    p.add_argument("--instruction", required=True)
    p.add_argument("--unnorm-key", default=None, help="dataset statistics key, e.g. bridge_orig")
    p.add_argument("--backend", default="torch", choices=["torch", "ttnn"])
    p.add_argument("--device", default=None, help="torch device: cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--mesh-device", default=os.environ.get("MESH_DEVICE"), help="ttnn mesh: N300 | T3K | auto")
    p.add_argument("--center-crop", action="store_true", help="central 90%% crop (LIBERO fine-tunes)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s: %(message)s")

    from .errors import OpenVLAError
    from .policy import load_policy

    if not args.weights:
        return _fail("no --weights given and OPENVLA_WEIGHTS is not set")
    try:
        rgb = read_rgb(args.image)
        with load_policy(args.weights, backend=args.backend, device=args.device, dtype=args.dtype,
                         mesh_device=args.mesh_device, center_crop=args.center_crop) as policy:
            result = policy.predict(rgb, args.instruction, unnorm_key=args.unnorm_key)
    except (OpenVLAError, OSError, ValueError) as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        names = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
        print(f"instruction: {args.instruction!r}  unnorm_key: {result.unnorm_key}")
        for n, v, nv, t, bad in zip(names, result.action, result.normalized, result.tokens, result.out_of_range):
            print(f"  {n:>7} = {v:+.5f}   (normalized {nv:+.4f}, token {t}{', OUT OF RANGE' if bad else ''})")
        print("  timings ms: " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings_ms.items()))
    return 0


def tiny_checkpoint_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="openvla-tiny-checkpoint",
                                description="Write a tiny RANDOM OpenVLA checkpoint in the HF layout "
                                            "(for tests and demos: its actions are meaningless).")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--shards", type=int, default=3, help="number of safetensors shards (1 = single file)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s: %(message)s")
    import torch

    from .tiny_checkpoint import write_tiny_checkpoint

    try:
        out = write_tiny_checkpoint(args.out_dir, seed=args.seed, num_shards=args.shards,
                                    dtype=getattr(torch, args.dtype))
    except OSError as e:
        return _fail(str(e))
    print(out)
    return 0
