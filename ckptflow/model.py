"""One decoder for every family, driven by ModelArgs, with torchtune ("tune") parameter names.

Llama 2/3.x, Mistral and Qwen2/2.5 differ only in ModelArgs: biases, tied embeddings, RoPE
scaling and the q/k row layout (`rope_interleaved`). Numerics follow HF transformers (RMSNorm in
float32, cos/sin in float32) so logits match an HF model of the same weights to ~1e-6 in float32.

`args.extra["sliding_window"]` (Mistral v0.1) limits attention to the last N keys, as HF does; with
`args.layer_types` only on the layers marked "sliding_attention" (Gemma 2/3).

The newer dense families switch on ModelArgs fields, never on family names: q/k norms per head or over
the whole projection (`qk_norm`), norms computing x * (1 + w) (`norm_offset`) or scaling in float32
(`norm_scale_f32`), scaled embeddings (`embed_scale`), GeGLU (`mlp_act`), post-block norms with or
without pre-norms (`post_norms`, `pre_norms`), the softmax scale (`attn_scalar`), attention and final
logit soft-caps, per-layer-type RoPE (`rope_local_theta`) and layers without RoPE (`no_rope_layers`).

The projections are plain `nn.Linear` attributes named q_proj, k_proj, v_proj, output_proj, w1,
w2, w3 and output: ckptflow.lora swaps them for LoRA-wrapped modules by those names.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ckptflow.errors import CkptError
from ckptflow.loss import cross_entropy_sum
from ckptflow.model_args import ModelArgs


def rope_inv_freq(args: ModelArgs, local: bool = False, long: bool = False) -> torch.Tensor:
    """Inverse frequencies [rotary_dim/2] in float32, with the llama3, linear or longrope scaling
    applied (longrope: the short factors, or the long ones with long=True).

    local: the sliding layers' RoPE (rope_local_theta / rope_local_scaling) where the family has one."""
    rd = args.rotary_dim
    theta, scaling = args.rope_theta, args.rope_scaling
    if local and args.rope_local_theta is not None:
        theta, scaling = args.rope_local_theta, args.rope_local_scaling
    # Explicitly on CPU: a meta-device build (from_state_dict) must still get real frequencies.
    steps = torch.arange(0, rd, 2, dtype=torch.int64, device="cpu").float()
    scaling = scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "longrope":  # HF: 1 / (ext_factor * base ** (2i / rd)), factors picked by length
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device="cpu")
        return 1.0 / (ext * theta ** (steps / rd))
    inv_freq = 1.0 / (theta ** (steps / rd))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scale(inv_freq, scaling)
    raise CkptError(f"rope_type {kind!r} is not supported (default, linear, llama3, longrope)")


def rope_attention_scaling(args: ModelArgs) -> float:
    """The factor HF multiplies cos and sin by: 1, or LongRoPE's sqrt(1 + ln(f) / ln(original))."""
    s = args.rope_scaling or {}
    if s.get("rope_type") != "longrope":
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or args.max_seq_len / orig
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > ctx / low, inv_freq / factor, inv_freq)
    smooth = (ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= ctx / high) & (wavelen <= ctx / low)
    return torch.where(medium, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, T, heads, hd] by cos/sin [T, rd/2] (float32), computed in float32; with a
    partial rotary factor (rd < hd) the last hd - rd dims pass through, as HF does."""
    rd = 2 * cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rd], cos, sin, interleaved), x[..., rd:]), dim=-1)
    xf = x.float()
    c, s = cos[:, None, :], sin[:, None, :]
    if interleaved:  # Meta layout: pairs (2j, 2j+1)
        x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:  # HF rotate-half layout: pairs (j, j + hd/2)
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.type_as(x)


class RMSNorm(nn.Module):
    """HF's three RMSNorms: Llama's (scale after the cast back), OLMo 2's (`f32`: scale in float32,
    then cast) and Gemma's (`offset`: x * (1 + w) in float32, then cast)."""

    def __init__(self, dim: int, eps: float, offset: bool = False, f32: bool = False):
        super().__init__()
        self.eps, self.offset, self.f32 = eps, offset, f32
        self.scale = nn.Parameter(torch.full((dim,), norm_init(offset)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (1.0 + self.scale.float())).type_as(x)
        if self.f32:
            return (self.scale * x32).to(x.dtype)
        # Llama's order: normalise in float32, cast back, then scale in the input dtype.
        return self.scale * x32.to(x.dtype)


def norm_init(offset: bool) -> float:
    """The weight a norm starts at, so that it only normalises: 0 where it computes x * (1 + w), else 1."""
    return 0.0 if offset else 1.0


def norm(args: ModelArgs, dim: int | None = None) -> RMSNorm:
    return RMSNorm(args.dim if dim is None else dim, args.norm_eps, args.norm_offset, args.norm_scale_f32)


class KVCache:
    """Per-layer key/value buffers [B, kv_heads, max_len, hd], filled in place as positions advance."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device=None, dtype=None):
        shape = (batch, args.kv_heads, max_len, args.hd)
        self.max_len = max_len
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]

    def update(self, layer: int, input_pos: int, k: torch.Tensor, v: torch.Tensor):
        end = input_pos + k.shape[2]
        if end > self.max_len:
            raise CkptError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.k[layer][:, :, input_pos:end] = k
        self.v[layer][:, :, input_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.hd = layer, args.n_heads, args.kv_heads, args.hd
        self.interleaved = args.rope_interleaved
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.kv_heads * args.hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.kv_heads * args.hd, bias=args.qkv_bias)
        self.output_proj = nn.Linear(args.n_heads * args.hd, args.dim, bias=args.attn_out_bias)
        self.qk_norm = args.qk_norm
        if args.qk_norm == "head":
            self.q_norm, self.k_norm = norm(args, args.hd), norm(args, args.hd)
        elif args.qk_norm == "proj":
            self.q_norm, self.k_norm = norm(args, args.n_heads * args.hd), norm(args, args.kv_heads * args.hd)
        elif args.qk_norm is not None:
            raise CkptError(f"qk_norm {args.qk_norm!r} is not supported (head, proj)")
        self.scale = None if args.attn_scalar is None else args.attn_scalar ** -0.5
        self.softcap = args.attn_softcap

    def forward(self, x, cos, sin, mask, cache: KVCache | None, input_pos: int):
        """cos/sin None: this layer applies no RoPE."""
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, T, self.n_heads, self.hd), k.view(B, T, self.n_kv, self.hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin, self.interleaved), apply_rope(k, cos, sin, self.interleaved)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, input_pos, k, v)
        k, v = self._expand(k), self._expand(v)
        if self.softcap is not None:
            out = self._softcapped(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return self.output_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))

    def _softcapped(self, q, k, v, mask):
        # HF's eager path (SDPA has no soft-cap): scores * scale, c * tanh(scores / c), mask, float32 softmax.
        scores = torch.matmul(q, k.transpose(2, 3)) * (self.scale or self.hd ** -0.5)
        scores = torch.tanh(scores / self.softcap) * self.softcap
        T, S = q.shape[2], k.shape[2]
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v)

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        # Grouped-query attention: query head h reads kv head h // (n_heads / n_kv), as HF repeat_kv.
        rep = self.n_heads // self.n_kv
        if rep == 1:
            return t
        B, n, S, hd = t.shape
        return t[:, :, None].expand(B, n, rep, S, hd).reshape(B, n * rep, S, hd)


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    """Gated MLP with the tune names w1 (gate), w2 (down), w3 (up); also one MoE expert (SwiGLU, no bias)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False, act: str = "silu"):
        super().__init__()
        if act not in ACTIVATIONS:
            raise CkptError(f"mlp_act {act!r} is not supported ({', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[act]
        self.w1 = nn.Linear(dim, hidden, bias=bias)  # gate
        self.w2 = nn.Linear(hidden, dim, bias=bias)  # down
        self.w3 = nn.Linear(dim, hidden, bias=bias)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Mixture of experts as transformers computes it (Mixtral, Qwen3-MoE): router logits, softmax
    in float32, top-k, renormalised over the chosen k when norm_topk_prob; each expert sees only
    its tokens, its output times the routing weight is summed in token order. Mixtral keeps the
    weights in float32 (`extra["moe_weights_float32"]`); Qwen3-MoE casts them to the activations'
    dtype first. One module per expert, so the state dict has one tensor per expert."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk = args.n_experts, args.n_active_experts, args.norm_topk_prob
        self.float32_weights = bool(args.extra.get("moe_weights_float32"))
        self.aux_coef = args.router_aux_loss_coef
        self.router = nn.Linear(args.dim, args.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(args.dim, args.expert_dim) for _ in range(args.n_experts))
        self.router_logits: torch.Tensor | None = None   # the last forward's, for the auxiliary loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        self.router_logits = logits if self.training else None
        probs = torch.softmax(logits.float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.float32_weights:
            weights = weights.to(logits.dtype)
        out = torch.zeros_like(x)
        hit = torch.bincount(chosen.flatten(), minlength=self.n_experts)
        for e in torch.nonzero(hit).flatten().tolist():
            slot, token = torch.where(chosen.T == e)     # HF's order: by top-k slot, then token
            y = self.experts[e](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.reshape(shape)


def load_balancing_loss(router_logits: list[torch.Tensor], n_experts: int, top_k: int) -> torch.Tensor:
    """transformers' load_balancing_loss_func without a mask (Switch Transformer eq. 4-6): the
    fraction of top-k assignments per expert times its mean router probability, summed, times E."""
    device = router_logits[0].device
    counts = torch.zeros(n_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(n_experts, dtype=torch.float32, device=device)
    rows = 0
    for logits in router_logits:
        probs = torch.softmax(logits, dim=-1)
        _, chosen = torch.topk(probs, top_k, dim=-1)
        counts = counts + torch.bincount(chosen.reshape(-1), minlength=n_experts).float()
        prob_sum = prob_sum + probs.float().sum(dim=0)
        rows += probs.shape[0]
    return torch.sum((counts / rows) * (prob_sum / rows)) * n_experts


def moe_blocks(model: nn.Module) -> list[MoE]:
    """The sparse layers' MoE modules, in order (none for a dense model): collected once by a
    trainer, which asks for their auxiliary loss every micro-batch."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def aux_loss(blocks: list[MoE]) -> tuple[torch.Tensor, float] | None:
    """(the router load-balancing loss of the last training forward over `blocks` (moe_blocks),
    its coefficient router_aux_loss_coef); None for a dense model or outside training."""
    moes = [m for m in blocks if m.router_logits is not None]
    if not moes:
        return None
    loss = load_balancing_loss([m.router_logits for m in moes], moes[0].n_experts, moes[0].top_k)
    for m in moes:
        m.router_logits = None
    return loss, moes[0].aux_coef


class TransformerBlock(nn.Module):
    """Pre-norm (sa_norm, mlp_norm) and/or post-norm (sa_scale, mlp_scale: on the block's output
    before the residual add) residual blocks; an absent norm is None."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.sa_norm = norm(args) if args.pre_norms else None
        self.attn = Attention(args, layer)
        self.sa_scale = norm(args) if args.post_norms else None
        self.mlp_norm = norm(args) if args.pre_norms else None
        self.mlp = MoE(args) if args.is_moe_layer(layer) else \
            MLP(args.dim, args.hidden_dim, args.mlp_bias, args.mlp_act)
        self.mlp_scale = norm(args) if args.post_norms else None

    def forward(self, x, cos, sin, mask, cache, input_pos):
        h = x + _maybe(self.sa_scale, self.attn(_maybe(self.sa_norm, x), cos, sin, mask, cache, input_pos))
        return h + _maybe(self.mlp_scale, self.mlp(_maybe(self.mlp_norm, h)))


def _maybe(module, x):
    return x if module is None else module(x)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = norm(args)
        # Tied: the head reads tok_embeddings.weight, so output.weight is absent from state_dict.
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies,
        # and a meta-device build must not leave them unmaterialised.
        # Keyed (local, long): the sliding layers' RoPE (gemma3); LongRoPE's long factors (phi3), used
        # once the sequence outgrows the original context.
        self._inv_freq = {(False, False): rope_inv_freq(args), (True, False): rope_inv_freq(args, local=True)}
        self._inv_freq_on: dict[tuple, torch.Tensor] = {}
        scaling = args.rope_scaling or {}
        self._long_after = None
        if scaling.get("rope_type") == "longrope":
            self._inv_freq[False, True] = rope_inv_freq(args, long=True)
            self._long_after = scaling["original_max_position_embeddings"]
        self._rope_scale = rope_attention_scaling(args)
        no_rope = set(args.no_rope_layers or ())
        # Per layer: None (no RoPE), False (the full layers' RoPE) or True (the sliding layers').
        self._rope_kind = [None if i in no_rope else args.is_sliding(i) and args.rope_local_theta is not None
                           for i in range(args.n_layers)]
        self._window = [args.extra.get("sliding_window") if args.is_sliding(i) else None
                        for i in range(args.n_layers)]
        # train.activation_checkpointing: recompute each decoder layer in the backward pass
        # instead of keeping its activations (torch.utils.checkpoint, non-reentrant).
        self.checkpoint_layers = False

    @classmethod
    def from_state_dict(cls, args: ModelArgs, sd: dict, *, device=None, dtype=None) -> "Transformer":
        """Build on the meta device and adopt the tensors of `sd` (strict, assign=True)."""
        with torch.device("meta"):
            model = cls(args)
        check_state_dict(model, sd)
        sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        return model

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Deterministic random init (normal(0, std) matrices, zero biases, unit norms)."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith(".scale"):
                    p.fill_(norm_init(self.args.norm_offset))
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=generator)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        w = self.tok_embeddings.weight
        return KVCache(self.args, batch, max_len, device or w.device, dtype or w.dtype)

    def forward(self, tokens: torch.Tensor, *, input_pos: int = 0, cache: KVCache | None = None,
                labels: torch.Tensor | None = None, loss_chunk: int | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] in float32 for tokens at positions input_pos .. input_pos+T-1.

        With `labels` [B, T] instead: the summed token cross-entropy (labels of loss.IGNORE skipped),
        computed `loss_chunk` tokens at a time (None: all at once) with each chunk's output
        projection recomputed in the backward pass, so a large vocabulary's logits never exist
        whole: at most one chunk's [loss_chunk, vocab] lives at a time, forward or backward.
        Inside forward (not a separate method) so FSDP's hooks gather the head's weights."""
        h = self.hidden(tokens, input_pos=input_pos, cache=cache)
        if labels is None:
            return self.head(h)
        return chunked_cross_entropy(self.head, h.flatten(0, 1), labels.flatten(), loss_chunk)

    def hidden(self, tokens: torch.Tensor, *, input_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """The final norm's output [B, T, dim]: everything but the output projection."""
        T = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        if self.args.embed_scale:  # HF: sqrt(dim) as a float32 tensor, cast to the activation dtype
            h = h * torch.tensor(self.args.dim ** 0.5).to(h.dtype)
        ropes = {kind: self._rope(kind, input_pos, T, h.device) for kind in set(self._rope_kind) - {None}}
        masks = {w: self._mask(w, input_pos, T, cache is not None, h.device) for w in set(self._window)}
        recompute = self.checkpoint_layers and self.training and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            cos, sin = ropes.get(self._rope_kind[i], (None, None))
            if recompute:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, masks[self._window[i]], None, input_pos,
                                                      use_reentrant=False)
            else:
                h = layer(h, cos, sin, masks[self._window[i]], cache, input_pos)
        return self.norm(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits in float32 from the final hidden states (tied or own output weight, soft-cap)."""
        logits = self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)
        if self.args.final_softcap is not None:
            logits = torch.tanh(logits / self.args.final_softcap) * self.args.final_softcap
        return logits.float()

    def _rope(self, local: bool, input_pos: int, T: int, device: torch.device):
        # As HF, a forward whose last position is past the original context uses LongRoPE's long
        # factors for all its positions (the cached keys keep the ones they were made with).
        long = not local and self._long_after is not None and input_pos + T > self._long_after
        inv_freq = self._inv_freq_on.get((local, long, device))
        if inv_freq is None:
            inv_freq = self._inv_freq_on[local, long, device] = self._inv_freq[local, long].to(device)
        pos = torch.arange(input_pos, input_pos + T, device=device, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        if self._rope_scale != 1.0:
            return freqs.cos() * self._rope_scale, freqs.sin() * self._rope_scale
        return freqs.cos(), freqs.sin()

    def _mask(self, window: int | None, input_pos: int, T: int, cached: bool, device):
        """None for plain causal attention (SDPA's is_causal); else a bool [T, S] mask."""
        if not cached and (window is None or window >= T):
            return None
        q_pos = torch.arange(input_pos, input_pos + T, device=device)[:, None]
        # With a cache the keys are positions 0 .. input_pos+T-1; without one, only these T tokens.
        k_pos = torch.arange(0 if cached else input_pos, input_pos + T, device=device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= (q_pos - k_pos) < window
        return allowed


def chunked_cross_entropy(head, h: torch.Tensor, labels: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """sum over tokens of cross_entropy(head(h), labels), h [N, dim], labels [N]; `chunk` tokens at a
    time, each chunk checkpointed (its logits are recomputed in the backward pass, then freed)."""
    if not chunk or chunk >= h.shape[0]:
        return _ce_sum(head, h, labels)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        hc, lc = h[start:start + chunk], labels[start:start + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + torch.utils.checkpoint.checkpoint(_ce_sum, head, hc, lc, use_reentrant=False)
        else:
            total = total + _ce_sum(head, hc, lc)
    return total


def _ce_sum(head, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return cross_entropy_sum(head(h), labels)


def check_state_dict(model: nn.Module, sd: dict) -> None:
    """One clear error for a missing, unexpected or mis-shaped key, before anything is loaded."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise CkptError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CkptError(f"{k}: shape {tuple(sd[k].shape)} does not match the config's {tuple(t.shape)}")


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> int:
    if temperature <= 0:
        return int(logits.argmax(-1))
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, eos_id: int | Iterable[int] | None = None,
             generator: torch.Generator | None = None) -> list[int]:
    """The new tokens after prompt_ids (not the prompt), greedy when temperature is 0.

    Stops after max_new_tokens or right after emitting an eos id (included in the result).
    """
    if not prompt_ids:
        raise CkptError("generate needs at least one prompt token")
    eos = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    device = model.tok_embeddings.weight.device
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    logits = model(torch.tensor([prompt_ids], device=device), input_pos=0, cache=cache)[0, -1]
    pos, out = len(prompt_ids), []
    while len(out) < max_new_tokens:
        token = _pick(logits, temperature, top_k, generator)
        out.append(token)
        if token in eos or len(out) == max_new_tokens:
            break
        logits = model(torch.tensor([[token]], device=device), input_pos=pos, cache=cache)[0, -1]
        pos += 1
    return out
