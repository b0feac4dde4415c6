"""Open and close the Tenstorrent mesh by name: N300 -> MeshShape(1, 2), T3K -> MeshShape(1, 8).

`tt` is the ttnn module (or the golden-function emulator the tests pass in its place).
Whatever fails while opening, the fabric is switched off again and the error is a BackendError
that says what to do.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ...errors import BackendError
from .ccl import fabric_config

log = logging.getLogger("openvla_model.ttnn")

MESH_SHAPES = {"N300": (1, 2), "T3K": (1, 8)}
# Boards with one Wormhole/Blackhole chip. OpenVLA-7B in BF16 is 15.1 GB of weights (plus KV
# cache and activations): it does not fit one chip's 12 GB of DRAM with BF16 attention.
SINGLE_CHIP = ("N150", "P100", "P150")
SINGLE_CHIP_REASON = ("OpenVLA-7B needs 15.1 GB for its BF16 weights (BF16 attention is required for "
                      "correct action tokens) and one chip has 12 GB of DRAM; use an N300 (1x2) or a T3K (1x8)")


def resolve_mesh_name(name: str | None, available: int) -> str:
    """N300 | T3K | auto (from the number of devices present) -> N300 | T3K, or BackendError."""
    want = (name or "auto").strip().upper()
    if want in SINGLE_CHIP:
        raise BackendError(f"ttnn backend: mesh_device {name!r} is a single-chip board: {SINGLE_CHIP_REASON}")
    if want == "AUTO":
        if available <= 0:
            raise BackendError("ttnn backend: mesh_device auto: no Tenstorrent device found (is the card installed and the "
                               "driver loaded? `tt-smi` lists them)")
        if available == 1:
            raise BackendError(f"ttnn backend: mesh_device auto: only 1 Tenstorrent chip found: {SINGLE_CHIP_REASON}")
        want = "T3K" if available >= MESH_SHAPES["T3K"][1] else "N300"
    if want not in MESH_SHAPES:
        raise BackendError(f"ttnn backend: unknown mesh_device {name!r}; choose one of: N300, T3K, auto")
    need = MESH_SHAPES[want][1]
    if available < need:
        found = "no Tenstorrent card found" if available == 0 else f"{available} found"
        raise BackendError(f"ttnn backend: mesh_device {want} needs {need} Tenstorrent chips, {found}")
    return want


def available_devices(tt) -> int:
    """Chips present (0 when there is no card: no /dev/tenstorrent and no mock cluster)."""
    real_ttnn = getattr(tt, "__name__", "") == "ttnn"
    if real_ttnn and not os.environ.get("TT_METAL_MOCK_CLUSTER_DESC_PATH") and not Path("/dev/tenstorrent").exists():
        return 0  # asking UMD would only print a fatal-error backtrace
    try:
        return int(tt.GetNumAvailableDevices())
    except Exception as e:  # the driver / UMD failing to enumerate
        if "No chips detected" in str(e):
            return 0
        raise BackendError(f"ttnn backend: cannot enumerate Tenstorrent devices: {e}") from e


class Mesh:
    """An open mesh device; close() is idempotent."""

    def __init__(self, tt, name: str, device, shape: tuple):
        self.tt, self.name, self.device, self.shape = tt, name, device, shape
        self.num_devices = shape[0] * shape[1]

    def close(self):
        if self.device is None:
            return
        device, self.device = self.device, None
        try:
            self.tt.close_mesh_device(device)
        except Exception as e:  # a dead device may refuse to close: report, do not mask the first error
            log.warning("closing the %s mesh failed: %s", self.name, e)
        finally:
            _fabric_off(self.tt)


def _fabric_off(tt):
    try:
        tt.set_fabric_config(tt.FabricConfig.DISABLED)
    except Exception:  # nothing to undo
        pass


def open_mesh(tt, name: str | None, profile_loader, device_options: dict | None = None) -> tuple[Mesh, object]:
    """Resolve the name, load its precision profile, configure the fabric for the collectives
    and open the mesh. Returns (Mesh, profile)."""
    mesh_name = resolve_mesh_name(name, available_devices(tt))
    profile = profile_loader(mesh_name)
    shape = MESH_SHAPES[mesh_name]
    if tuple(profile.mesh_shape) != shape:
        raise BackendError(f"{profile.source}: mesh_shape {list(profile.mesh_shape)} does not match {mesh_name} {list(shape)}")
    opts = {**profile.device, **(device_options or {})}
    try:
        # The collectives run over the ethernet fabric; it must be configured before open:
        # FABRIC_1D_RING on T3K (Ring topology), FABRIC_1D on N300 (Linear): ccl.fabric_config.
        tt.set_fabric_config(fabric_config(tt, mesh_name))
        device = tt.open_mesh_device(
            mesh_shape=tt.MeshShape(*shape),
            trace_region_size=int(opts.get("trace_region_size", 200_000_000)),
            num_command_queues=int(opts.get("num_command_queues", 1)),
            l1_small_size=int(opts.get("l1_small_size", 81920)),
        )
    except Exception as e:
        _fabric_off(tt)
        raise BackendError(f"ttnn backend: cannot open the {mesh_name} mesh {list(shape)}: {e}") from e
    log.info("opened %s mesh %s", mesh_name, shape)
    return Mesh(tt, mesh_name, device, shape), profile
