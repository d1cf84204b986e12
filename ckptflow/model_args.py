"""ModelArgs: the hyper-parameters of ckptflow's one decoder, free of torch so the CLI stays light."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    hidden_dim: int                     # SwiGLU inner size (HF intermediate_size)
    n_kv_heads: int | None = None       # None means n_heads
    head_dim: int | None = None         # None means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} (also "linear" with "factor").
    rope_scaling: dict | None = None
    rope_interleaved: bool = True       # tune layout of q/k rows: Meta (interleaved) or HF (rotate-half)
    max_seq_len: int = 2048
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    # Phi-3/Phi-4-mini: RoPE turns only the first int(hd * factor) dims of each head (HF rounds down).
    partial_rotary_factor: float = 1.0
    # Mixture of experts (Mixtral, Qwen3-MoE): 0 experts is a dense model. Sparse layers route each
    # token to n_active_experts of n_experts SwiGLU experts of moe_hidden_dim (None: hidden_dim);
    # dense_layers keep a plain MLP of hidden_dim (Qwen3-MoE's mlp_only_layers/decoder_sparse_step).
    n_experts: int = 0
    n_active_experts: int = 0
    moe_hidden_dim: int | None = None
    norm_topk_prob: bool = True
    dense_layers: list = field(default_factory=list)
    router_aux_loss_coef: float = 0.0
    extra: dict = field(default_factory=dict)
    qk_norm: str | None = None          # "head": RMSNorm over head_dim on each head (qwen3, qwen3_moe)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE turns (even), as HF's int(head_dim * factor)."""
        return int(self.hd * self.partial_rotary_factor)

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer not in self.dense_layers

    @property
    def expert_dim(self) -> int:
        return self.moe_hidden_dim or self.hidden_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model_args keys: {sorted(unknown)}")
        return cls(**d)

    def num_params(self) -> int:
        hd, kv = self.hd, self.kv_heads
        attn = self.dim * hd * (self.n_heads * 2 + kv * 2)
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * kv)
        if self.attn_out_bias:
            attn += self.dim
        mlp = 3 * self.dim * self.hidden_dim + (2 * self.hidden_dim + self.dim if self.mlp_bias else 0)
        attn += {None: 0, "head": 2 * hd}[self.qk_norm]
        moe = self.n_experts * 3 * self.dim * self.expert_dim + self.n_experts * self.dim
        layers = sum(attn + (moe if self.is_moe_layer(i) else mlp) + 2 * self.dim for i in range(self.n_layers))
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + layers + self.dim + head
