"""Bad input against the real ttnn on a MOCK N300 (run by test_ttnn_mock.py in a subprocess):
auto-detection, too few devices, a checkpoint that does not match the config, a device that
dies mid-run. Prints one JSON object with what happened."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_mock_model import ZeroCheckpoint, write_full_width_config  # noqa: E402


def main() -> int:
    import ttnn

    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.backends.ttnn.mesh import open_mesh
    from openvla_model.backends.ttnn.model_config import load_profile
    from openvla_model.config import load_config
    from openvla_model.errors import BackendError, CheckpointError

    work = Path(sys.argv[1])
    out = {}
    mesh, _ = open_mesh(ttnn, "auto", load_profile)
    out["auto"] = [mesh.name, mesh.num_devices]
    mesh.close()
    mesh.close()  # idempotent

    try:
        open_mesh(ttnn, "T3K", load_profile)
        out["t3k_on_n300"] = "opened?!"
    except BackendError as e:
        out["t3k_on_n300"] = str(e)

    config = load_config(write_full_width_config(work / "weights", 1, 3))

    class WrongCheckpoint(ZeroCheckpoint):
        def validate(self, expected):
            raise CheckpointError("language_model.lm_head.weight missing from the checkpoint (test)")

    try:
        TtnnBackend(config, WrongCheckpoint(), mesh_device="N300", cache_dir=None, trace=False)
        out["bad_weights"] = "loaded?!"
    except CheckpointError as e:
        out["bad_weights"] = str(e)

    backend = TtnnBackend(config, ZeroCheckpoint(), mesh_device="N300", cache_dir=None, trace=False)

    def dies(*_, **__):
        raise RuntimeError("simulated: device stopped responding")

    backend.llm.decode_step = dies
    import numpy as np
    import torch

    try:
        backend.generate(torch.zeros(1, 6, 224, 224), np.array([1, 100, 29871]), 7)
        out["mid_run"] = "no error?!"
    except BackendError as e:
        out["mid_run"] = str(e)
    out["closed_after_failure"] = backend.mesh.device is None
    try:
        backend.generate(torch.zeros(1, 6, 224, 224), np.array([1, 100, 29871]), 7)
    except BackendError as e:
        out["after_failure"] = str(e)
    # The mesh really was released: it opens again in the same process.
    mesh, profile = open_mesh(ttnn, "N300", load_profile)
    out["reopen"] = mesh.name
    # Weight cache: the first put converts and writes a ttnn cache file, the second loads it
    # (replicated and sharded tensors), without calling make() again.
    from openvla_model.backends.ttnn.weights import WeightStore

    store = WeightStore(ttnn, mesh, ZeroCheckpoint(), profile, cache_dir=work / "weight_cache")
    made = []

    def make():
        made.append(1)
        return torch.arange(64 * 128, dtype=torch.float32).reshape(64, 128)

    from openvla_model.backends.ttnn.linear import Linear

    assert profile.decode_matmul == "dram_sharded"
    for _ in range(2):
        rep = store.put("test.replicated", make, ttnn.bfloat16)
        shard = store.put("test.sharded", make, ttnn.bfloat8_b, shard_dim=1)
        # a DRAM-sharded decode weight: the cache holds the tiles, the load re-shards them
        lin = Linear(ttnn, mesh, profile, store, "test.linear", make, ttnn.bfloat16, shard_dim=1,
                     in_features=64, out_features=64, compute=profile.compute_config(ttnn, "ffn"))
        row = ttnn.from_torch(torch.zeros(1, 1, 1, 64), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT,
                              device=mesh.device, mesh_mapper=ttnn.ReplicateTensorToMesh(mesh.device))
        y = lin.decode(row, ttnn.bfloat16)
    out["cache"] = {"hits": store.hits, "misses": store.misses, "made": len(made),
                    "dir": list(store.cache_dir.relative_to(work / "weight_cache").parts),
                    "files": sorted(p.name for p in store.cache_dir.iterdir()),
                    "shapes": [list(rep.shape), list(shard.shape), list(y.shape)],
                    "linear_layout": str(lin.weight.memory_config().memory_layout)}
    mesh.close()
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
