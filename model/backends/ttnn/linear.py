"""A weight (in, out) of the tensor-parallel LM and the way to multiply by it in prefill (many
rows) and in decode (one row).

`decode_matmul` in the precision profile picks the weight layout:
- dram_sharded (what both profiles, config/ttnn/N300.yaml and T3K.yaml, use): the weight
  width-sharded over the DRAM banks; decode uses the DRAM-sharded matmul (activation row
  width-sharded in L1, each DRAM bank streamed by its nearest core: the bandwidth-bound decode
  step reads weights near peak DRAM bandwidth), prefill a 2D multicast matmul with an explicit
  program config (ttnn 0.81.1's default matmul needs an interleaved weight). Validated on mock
  devices; its speed and numbers are still to be measured on a card.
- interleaved (the fallback: profile_overrides={"decode_matmul": "interleaved"}, or a profile
  file without the key): DRAM-interleaved weight, plain ttnn.linear in both phases.
"""
from __future__ import annotations

import math

from .weights import TILE


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


class Linear:
    def __init__(self, tt, mesh, profile, store, name: str, make, dtype, *, shard_dim: int,
                 in_features: int, out_features: int, compute, decode_compute=None):
        """in_features / out_features: this chip's K and N (after tensor-parallel sharding).
        decode_compute: compute config of the DRAM-sharded decode matmul (default: `compute`)."""
        self.tt, self.mesh, self.compute = tt, mesh, compute
        self.decode_compute = decode_compute or compute
        self.k, self.n = in_features, out_features
        self.dram_sharded = profile.decode_matmul == "dram_sharded"
        memory_config = None
        if self.dram_sharded:
            dev = mesh.device
            banks = dev.dram_grid_size().x
            self.n_padded = math.ceil(self.n / (TILE * banks)) * TILE * banks
            bank_grid = tt.CoreRangeSet({tt.CoreRange(tt.CoreCoord(0, 0), tt.CoreCoord(banks - 1, 0))})
            memory_config = tt.MemoryConfig(tt.TensorMemoryLayout.WIDTH_SHARDED, tt.BufferType.DRAM,
                                            tt.ShardSpec(bank_grid, (self.k, self.n_padded // banks),
                                                         tt.ShardOrientation.ROW_MAJOR))
            k_tiles = self.k // TILE
            grid = dev.compute_with_storage_grid_size()
            cores = _largest_divisor(k_tiles, grid.x * grid.y)
            self.decode_input = tt.create_sharded_memory_config(
                (TILE, self.k // cores), tt.num_cores_to_corerangeset(cores, grid, row_wise=True),
                tt.ShardStrategy.WIDTH, tt.ShardOrientation.ROW_MAJOR, use_height_and_width_as_shard_shape=True)
            self.decode_program = tt.MatmulMultiCoreReuseMultiCastDRAMShardedProgramConfig(
                in0_block_w=k_tiles // cores, per_core_M=1, per_core_N=self.n_padded // TILE // banks)
            self.grid = (grid.x, grid.y)
            self._prefill_programs = {}
        self.weight = store.put(name, make, dtype, shard_dim=shard_dim, memory_config=memory_config)

    def _prefill_program(self, rows: int):
        tt = self.tt
        if rows not in self._prefill_programs:
            gx, gy = self.grid
            m_tiles, n_tiles, k_tiles = math.ceil(rows / TILE), self.n // TILE, self.k // TILE
            per_core_m, per_core_n = math.ceil(m_tiles / gy), math.ceil(n_tiles / gx)
            sub_w = _largest_divisor(per_core_n, 4)
            self._prefill_programs[rows] = tt.MatmulMultiCoreReuseMultiCastProgramConfig(
                compute_with_storage_grid_size=(gx, gy), in0_block_w=_largest_divisor(k_tiles, 4),
                out_subblock_h=_largest_divisor(per_core_m, 4 // sub_w), out_subblock_w=sub_w,
                per_core_M=per_core_m, per_core_N=per_core_n, transpose_mcast=False, fused_activation=None,
                fuse_batch=False)
        return self._prefill_programs[rows]

    def prefill(self, x, dtype):
        tt = self.tt
        if not self.dram_sharded:
            return tt.linear(x, self.weight, compute_kernel_config=self.compute, dtype=dtype)
        return tt.linear(x, self.weight, program_config=self._prefill_program(x.shape[2]),
                         compute_kernel_config=self.compute, dtype=dtype)

    def decode(self, x, dtype, dram_output: bool = False):
        """x: (1, 1, 1, K) interleaved -> (1, 1, 1, N) interleaved (in L1, or DRAM if dram_output:
        sdpa_decode wants an interleaved Q in DRAM)."""
        tt = self.tt
        if not self.dram_sharded:
            return tt.linear(x, self.weight, compute_kernel_config=self.compute, dtype=dtype)
        y = self.decode_sharded(tt.to_memory_config(x, self.decode_input), dtype)
        return tt.sharded_to_interleaved(y, tt.DRAM_MEMORY_CONFIG if dram_output else tt.L1_MEMORY_CONFIG)

    def decode_sharded(self, x, dtype):
        """DRAM-sharded decode matmul on an activation row ALREADY in `decode_input`'s layout
        (width-sharded in L1; one reshard may feed several weights of the same K, e.g. W1 and W3)
        -> (1, 1, 1, N) width-sharded in L1."""
        return self.tt.linear(x, self.weight, program_config=self.decode_program,
                              memory_config=self.tt.L1_WIDTH_SHARDED_MEMORY_CONFIG,
                              compute_kernel_config=self.decode_compute, dtype=dtype)
