"""Console scripts: openvla-predict, openvla-tiny-checkpoint. Errors: one clear line, exit 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .inputs import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_INSTRUCTION_CHARS


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def predict_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="openvla-predict", description="Run OpenVLA once on an image.")
    p.add_argument("--weights", default=os.environ.get("OPENVLA_WEIGHTS"),
                   help="weights directory in the HF openvla-7b layout (default: $OPENVLA_WEIGHTS)")
    p.add_argument("--image", required=True,
                   help="JPEG or PNG file (checked like a camera frame: size from the header, no corrupt data)")
    p.add_argument("--instruction", required=True, help="checked like the node's instruction topic")
    p.add_argument("--unnorm-key", default=None, help="dataset statistics key, e.g. bridge_orig")
    p.add_argument("--backend", default="torch", choices=["torch", "ttnn"])
    p.add_argument("--device", default=None, help="torch device: auto | cpu | cuda | cuda:N (default: auto = cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--mesh-device", default=os.environ.get("MESH_DEVICE"), help="ttnn mesh: N300 | T3K | auto")
    p.add_argument("--center-crop", action="store_true", help="central 90%% crop (LIBERO fine-tunes)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="larger images are refused from their header, before decoding (as the node's max_image_pixels)")
    p.add_argument("--max-instruction-chars", type=int, default=DEFAULT_MAX_INSTRUCTION_CHARS,
                   help="longer instructions are refused (as the node's max_instruction_chars)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s: %(message)s")

    from .errors import OpenVLAError
    from .inputs import check_instruction, read_image_file

    if not args.weights:
        return _fail("no --weights given and OPENVLA_WEIGHTS is not set")
    if args.max_image_pixels < 1 or args.max_instruction_chars < 1:
        return _fail("--max-image-pixels and --max-instruction-chars must be >= 1")
    try:
        # Inputs first, with the node's checks (openvla_model.inputs), before any weights load.
        instruction = check_instruction(args.instruction, args.max_instruction_chars)
        rgb = read_image_file(args.image, args.max_image_pixels)
        if args.backend == "torch":
            from .backends.torch_backend import resolve_device

            resolve_device(args.device)  # an unknown --device: one line listing the valid ones
        from .policy import load_policy

        with load_policy(args.weights, backend=args.backend, device=args.device, dtype=args.dtype,
                         mesh_device=args.mesh_device, center_crop=args.center_crop) as policy:
            result = policy.predict(rgb, instruction, unnorm_key=args.unnorm_key)
    except (OpenVLAError, OSError, ValueError) as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        names = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
        print(f"instruction: {instruction!r}  unnorm_key: {result.unnorm_key}")
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
