"""One Llama decoder layer: RMSNorm -> attention -> residual, RMSNorm -> MLP -> residual.
rms_norm_eps comes from the checkpoint's text_config (never hard-coded).

Fused decode graph (`decode_fused`, decode_graph: fused with decode_matmul: dram_sharded): the
residual row stays width-sharded in L1 between layers, in the decode input layout of WQKV / W1 /
W3 (all K = hidden), so the sharded RMSNorm writes straight into the matmuls' input layout and
the all-reduces gather straight into the residual's: 24 device ops per layer (norm, attention
13, add, norm, MLP 7, add; 4 of them collectives), counted by op_report.py on mock meshes."""
from __future__ import annotations

from .attention import Attention
from .mlp import MLP
from .weights import as_row


class DecoderLayer:
    def __init__(self, tt, mesh, profile, store, llm_cfg, layer: int, rope, max_seq: int, ccl):
        self.tt = tt
        self.eps = float(llm_cfg.rms_norm_eps)
        pre = f"model.layers.{layer}."
        self.attn_norm = store.put(f"llm.{layer}.attn_norm",
                                   lambda: as_row(store.raw("llm", pre + "input_layernorm.weight")), tt.bfloat16)
        self.ffn_norm = store.put(f"llm.{layer}.ffn_norm",
                                  lambda: as_row(store.raw("llm", pre + "post_attention_layernorm.weight")), tt.bfloat16)
        self.attention = Attention(tt, mesh, profile, store, llm_cfg, layer, rope, max_seq, ccl)
        self.mlp = MLP(tt, mesh, profile, store, llm_cfg, layer, ccl)
        self.norm_compute = profile.compute_config(tt, "qkv")
        self.fused = None  # (residual memory config, sharded-norm program): set by LLM for the fused graph

    def _norm_sharded(self, x, w, memcfg, program):
        return self.tt.rms_norm(x, weight=w, epsilon=self.eps, program_config=program, memory_config=memcfg,
                                compute_kernel_config=self.norm_compute)

    def _decode_fused(self, x, pos, cos, sin):
        """x: (1, 1, batch, hidden) residual width-sharded in `memcfg` -> the same, one layer on."""
        tt, (memcfg, norm_program) = self.tt, self.fused
        h = tt.add(x, self.attention.decode_fused(self._norm_sharded(x, self.attn_norm, memcfg, norm_program),
                                                  pos, cos, sin, memcfg), memory_config=memcfg)
        return tt.add(h, self.mlp.decode_fused(self._norm_sharded(h, self.ffn_norm, memcfg, norm_program), memcfg),
                      memory_config=memcfg)

    def _norm(self, x, w):
        return self.tt.rms_norm(x, weight=w, epsilon=self.eps, compute_kernel_config=self.norm_compute)

    def prefill(self, x, seq: int, cos, sin, causal: bool = True, attn_mask=None, slot: int = 0):
        tt = self.tt
        x = tt.add(x, self.attention.prefill(self._norm(x, self.attn_norm), seq, cos, sin, causal, attn_mask, slot))
        return tt.add(x, self.mlp(self._norm(x, self.ffn_norm)))

    def decode(self, x, pos, cos, sin):
        if self.fused is not None:
            return self._decode_fused(x, pos, cos, sin)
        tt = self.tt
        x = tt.add(x, self.attention.decode(self._norm(x, self.attn_norm), pos, cos, sin))
        return tt.add(x, self.mlp(self._norm(x, self.ffn_norm), decode=True))
