"""ModelArgs: the hyper-parameters of ckptflow's one decoder, free of torch so the CLI stays light."""
from __future__ import annotations

import dataclasses
import math
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
    # --- attention / norm / RoPE / embedding features of the newer dense families; the defaults are
    # Llama's, so a manifest written before these fields existed reads the same model.
    qk_norm: str | None = None          # "head": RMSNorm over head_dim on each head (qwen3, gemma3);
    #                                     "proj": over the whole q and k projections (olmo2)
    norm_offset: bool = False           # norms hold w and compute x * (1 + w) in float32 (gemma)
    norm_scale_f32: bool = False        # norms multiply by w in float32, then cast (olmo2)
    embed_scale: bool = False           # embeddings times sqrt(dim) in the activation dtype (gemma)
    mlp_act: str = "silu"               # "silu" (SwiGLU) | "gelu_tanh" (GeGLU, gemma)
    pre_norms: bool = True              # sa_norm / mlp_norm before attention / MLP (olmo2: none)
    post_norms: bool = False            # sa_scale / mlp_scale on the block outputs before the residual add
    attn_scalar: float | None = None    # softmax scale attn_scalar**-0.5 (query_pre_attn_scalar), else hd**-0.5
    attn_softcap: float | None = None   # attention logits c * tanh(x / c) (gemma2)
    final_softcap: float | None = None  # output logits c * tanh(x / c) (gemma2)
    # Per layer "full_attention" | "sliding_attention"; the sliding ones use extra["sliding_window"].
    # None: every layer uses extra["sliding_window"] when set (Mistral).
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None   # RoPE of the sliding layers (gemma3); None: as the full ones
    rope_local_scaling: dict | None = None
    no_rope_layers: list[int] | None = None  # indices of layers that apply no RoPE (smollm3)

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

    def is_sliding(self, layer: int) -> bool:
        if self.layer_types is None:
            return self.extra.get("sliding_window") is not None
        return self.layer_types[layer] == "sliding_attention" and self.extra.get("sliding_window") is not None

    def num_params(self) -> int:
        """The parameter count: the sum over expected_shapes, so each new field is counted in one place."""
        return sum(math.prod(shape) for shape in expected_shapes(self).values())


def expected_shapes(a: ModelArgs) -> dict[str, list[int]]:
    """Every tune key the model has, with its shape: the check a config must pass against tensors."""
    hd, kv = a.hd, a.kv_heads
    shapes = {"tok_embeddings.weight": [a.vocab_size, a.dim], "norm.scale": [a.dim]}
    if not a.tie_embeddings:
        shapes["output.weight"] = [a.vocab_size, a.dim]
    for i in range(a.n_layers):
        p = f"layers.{i}."
        if a.pre_norms:
            shapes.update({p + "sa_norm.scale": [a.dim], p + "mlp_norm.scale": [a.dim]})
        if a.post_norms:
            shapes.update({p + "sa_scale.scale": [a.dim], p + "mlp_scale.scale": [a.dim]})
        if a.qk_norm is not None:
            q, k = ([hd], [hd]) if a.qk_norm == "head" else ([a.n_heads * hd], [kv * hd])
            shapes.update({p + "attn.q_norm.scale": q, p + "attn.k_norm.scale": k})
        shapes.update({
            p + "attn.q_proj.weight": [a.n_heads * hd, a.dim], p + "attn.k_proj.weight": [kv * hd, a.dim],
            p + "attn.v_proj.weight": [kv * hd, a.dim], p + "attn.output_proj.weight": [a.dim, a.n_heads * hd],
        })
        shapes.update(_mlp_shapes(a, i) if a.is_moe_layer(i) else {
            p + "mlp.w1.weight": [a.hidden_dim, a.dim], p + "mlp.w3.weight": [a.hidden_dim, a.dim],
            p + "mlp.w2.weight": [a.dim, a.hidden_dim],
        })
        if a.qkv_bias:
            shapes.update({p + "attn.q_proj.bias": [a.n_heads * hd], p + "attn.k_proj.bias": [kv * hd],
                           p + "attn.v_proj.bias": [kv * hd]})
        if a.attn_out_bias:
            shapes[p + "attn.output_proj.bias"] = [a.dim]
        if a.mlp_bias:
            shapes.update({p + "mlp.w1.bias": [a.hidden_dim], p + "mlp.w3.bias": [a.hidden_dim],
                           p + "mlp.w2.bias": [a.dim]})
    return shapes


def _mlp_shapes(a: ModelArgs, i: int) -> dict[str, list[int]]:
    """A mixture-of-experts layer: the router, then one w1/w2/w3 per expert."""
    p, h = f"layers.{i}.mlp.", a.expert_dim
    shapes = {p + "router.weight": [a.n_experts, a.dim]}
    for e in range(a.n_experts):
        shapes.update({f"{p}experts.{e}.w1.weight": [h, a.dim], f"{p}experts.{e}.w2.weight": [a.dim, h],
                       f"{p}experts.{e}.w3.weight": [h, a.dim]})
    return shapes
