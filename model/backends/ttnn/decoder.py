"""One Llama decoder layer: RMSNorm -> attention -> residual, RMSNorm -> MLP -> residual.
rms_norm_eps comes from the checkpoint's text_config (never hard-coded)."""
from __future__ import annotations

from .attention import Attention
from .mlp import MLP
from .weights import as_row


class DecoderLayer:
    def __init__(self, tt, mesh, profile, store, llm_cfg, layer: int, rope, max_seq: int):
        self.tt = tt
        self.eps = float(llm_cfg.rms_norm_eps)
        pre = f"model.layers.{layer}."
        self.attn_norm = store.put(f"llm.{layer}.attn_norm",
                                   lambda: as_row(store.raw("llm", pre + "input_layernorm.weight")), tt.bfloat16)
        self.ffn_norm = store.put(f"llm.{layer}.ffn_norm",
                                  lambda: as_row(store.raw("llm", pre + "post_attention_layernorm.weight")), tt.bfloat16)
        self.attention = Attention(tt, mesh, profile, store, llm_cfg, layer, rope, max_seq)
        self.mlp = MLP(tt, mesh, profile, store, llm_cfg, layer)
        self.norm_compute = profile.compute_config(tt, "qkv")

    def _norm(self, x, w):
        return self.tt.rms_norm(x, weight=w, epsilon=self.eps, compute_kernel_config=self.norm_compute)

    def prefill(self, x, seq: int, cos, sin):
        tt = self.tt
        x = tt.add(x, self.attention.prefill(self._norm(x, self.attn_norm), seq, cos, sin))
        return tt.add(x, self.mlp(self._norm(x, self.ffn_norm)))

    def decode(self, x, pos, cos, sin):
        tt = self.tt
        x = tt.add(x, self.attention.decode(self._norm(x, self.attn_norm), pos, cos, sin))
        return tt.add(x, self.mlp(self._norm(x, self.ffn_norm), decode=True))
