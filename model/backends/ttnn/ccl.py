"""Collectives of the tensor-parallel LM, in one place (the pattern of tt-metal's
models/tt_transformers/tt/ccl.py): attention, MLP and the LM head ask this object for an
all-reduce or an all-gather, none of them opens a collective itself.

- Asynchronous CCLs only: `ttnn.experimental.reduce_scatter_minimal_async` and
  `ttnn.experimental.all_gather_async`. They synchronise the chips through persistent global
  semaphores instead of host-side program-creation barriers, which is what makes them safe
  inside a captured and replayed trace (a synchronous `ttnn.all_reduce` in a replayed trace is
  the pattern behind known trace-replay corruption on T3K).
- The semaphores are created ONCE when the model loads (`ttnn.create_global_semaphore` on the
  whole compute grid) in two sets per kind, and every call takes the next set (double
  buffering: consecutive collectives never share a semaphore). `reset()` puts every cycle back
  to its start, so a trace captured after `reset()` replays exactly the sequence of semaphores
  it recorded.
- Topology per mesh: Linear on N300 (two chips joined by one ethernet pair), Ring on T3K (the 8
  chips of a 1x8 T3K form a ring; tt_transformers' `ccl_topology()` picks Ring there). Ring
  needs the fabric opened as FABRIC_1D_RING (`fabric_config`, used by mesh.py before the mesh
  opens); verified on the mock T3K: FABRIC_1D_RING opens and both async CCLs validate with Ring.
- An all-reduce is a reduce-scatter followed by an all-gather (two device ops, two launches).
- Collective dtype (`ccl_dtype` in the precision profile, default bfloat16): in prefill the
  reduce-scatter input may be cast to it (bfloat8_b halves the ethernet bytes of the 288-row
  payloads); decode payloads are a few kB (latency-bound) and are never cast.
"""
from __future__ import annotations

RING_MESHES = ("T3K",)
SEMAPHORE_SETS = 2  # double buffering, as tt_transformers
# Semaphores per call: all-gather 2, reduce-scatter 3 (the async ops' contracts), + 1 barrier.
SEMAPHORES_PER_KIND = {"all_gather": 2, "reduce_scatter": 3, "barrier": 1}
# tt_transformers' link / worker settings for 1xN Wormhole meshes (one ethernet link per hop).
NUM_LINKS = 1
TUNING = dict(chunks_per_sync=10, num_workers_per_link=2, num_buffers_per_channel=2)


def fabric_config(tt, mesh_name: str):
    """The fabric the mesh's collectives need, set before the mesh opens."""
    return tt.FabricConfig.FABRIC_1D_RING if mesh_name in RING_MESHES else tt.FabricConfig.FABRIC_1D


def topology(tt, mesh_name: str):
    return tt.Topology.Ring if mesh_name in RING_MESHES else tt.Topology.Linear


class CCL:
    """Persistent semaphores + the two async collectives of a 1xN mesh."""

    def __init__(self, tt, mesh, profile=None):
        self.tt, self.mesh = tt, mesh
        self.n = mesh.num_devices
        self.topology = topology(tt, mesh.name)
        self.ccl_dtype = profile.dtype(tt, "ccl") if profile is not None and "ccl" in profile.dtypes else None
        self.act_dtype = profile.dtype(tt, "activations") if profile is not None else None
        self.launches = 0  # collective device ops issued (tests, report)
        self._sems = {}
        self._next = {}
        if self.n > 1:
            grid = mesh.device.compute_with_storage_grid_size()
            cores = tt.CoreRangeSet({tt.CoreRange(tt.CoreCoord(0, 0), tt.CoreCoord(grid.x - 1, grid.y - 1))})
            for kind, count in SEMAPHORES_PER_KIND.items():
                self._sems[kind] = [[tt.create_global_semaphore(mesh.device, cores, 0) for _ in range(count)]
                                    for _ in range(SEMAPHORE_SETS)]
        self.reset()

    def reset(self):
        """Every semaphore cycle back to set 0 (call before capturing a trace)."""
        self._next = {kind: 0 for kind in SEMAPHORES_PER_KIND}

    def _take(self, kind: str) -> list:
        i = self._next[kind]
        self._next[kind] = (i + 1) % SEMAPHORE_SETS
        return self._sems[kind][i]

    def _common(self):
        return dict(barrier_semaphore=self._take("barrier")[0], num_links=NUM_LINKS, topology=self.topology, **TUNING)

    def reduce_scatter(self, x, dim: int = 3, memory_config=None):
        """Sum over the chips, chip i keeps the i-th of N equal slices along `dim`."""
        self.launches += 1
        return self.tt.experimental.reduce_scatter_minimal_async(
            x, dim=dim, multi_device_global_semaphore=self._take("reduce_scatter"), memory_config=memory_config,
            **self._common())

    def all_gather(self, x, dim: int = 3, memory_config=None):
        """Every chip gets the chips' slices concatenated along `dim` in device order."""
        if self.n == 1:
            return x
        self.launches += 1
        return self.tt.experimental.all_gather_async(
            x, dim=dim, multi_device_global_semaphore=self._take("all_gather"), memory_config=memory_config,
            **self._common())

    def all_reduce(self, x, prefill: bool = False, memory_config=None):
        """Sum the row-parallel partial results of every chip; every chip gets the sum."""
        if self.n == 1:
            return x
        if prefill and self.ccl_dtype is not None and self.ccl_dtype != self.act_dtype:
            x = self.tt.typecast(x, self.ccl_dtype)
        # the reduce-scatter keeps its input's layout (halved); memory_config places the gathered sum
        return self.all_gather(self.reduce_scatter(x, 3), 3, memory_config)
