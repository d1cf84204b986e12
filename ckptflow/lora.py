"""LoRA: low-rank adapters on the nn.Linear modules of ckptflow.model, in torchtune names.

    cfg = LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"])
    apply_lora(model, cfg)                  # swaps the targets, freezes everything else
    sd = lora_state_dict(model)             # layers.0.attn.q_proj.lora_a.weight [r, in], ...lora_b.weight [out, r]
    merged = merge_lora(base_sd, sd, cfg)   # W + scale * B @ A, in float32, cast back

A wrapped module keeps its base parameters as `weight` / `bias`, so the model's state dict
still holds the base under the usual tune names, and the adapter keys sit beside them.
The scale is alpha / r, or alpha / sqrt(r) with rsLoRA.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass, field

from ckptflow.errors import CkptError

log = logging.getLogger(__name__)

TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3", "output")
SUFFIXES = (".lora_a.weight", ".lora_b.weight")
# The HF module names peft users write, as tune modules (fused Phi-3 names adapt every part).
HF_TARGETS = {
    "o_proj": ("output_proj",), "gate_proj": ("w1",), "up_proj": ("w3",), "down_proj": ("w2",),
    "qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("w1", "w3"), "lm_head": ("output",),
    # peft's "all-linear": every linear layer but the output head.
    "all-linear": ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"),
}


def normalize_targets(targets) -> list[str]:
    """Tune module names for targets given in tune or HF (peft) names, in first-seen order."""
    out: list[str] = []
    for t in targets:
        for name in HF_TARGETS.get(t, (t,)):
            if name not in out:
                out.append(name)
    return out


MLP = ("w1", "w2", "w3")


def adaptable(module_path: str, moe: bool = False) -> bool:
    """Whether a module may take LoRA. In a mixture-of-experts model only attention and the head:
    transformers 5 keeps the experts as grouped 3-D parameters, and peft (0.21) reads every
    gate/up/down_proj target of such a model as those experts' parameters, so a LoRA on a dense
    layer's MLP (Qwen3-MoE's mlp_only_layers) would not load where it was trained."""
    return not (moe and module_path.rsplit(".", 1)[-1] in MLP) and ".experts." not in module_path


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CkptError(f"unknown LoRA settings: {sorted(unknown)}")
        cfg = cls(**d)
        cfg.targets = list(cfg.targets)
        cfg.check()
        return cfg

    def __post_init__(self):
        self.targets = normalize_targets(self.targets)

    def check(self) -> None:
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise CkptError(f"lora.targets: unknown module {bad[0]!r} (choose from {', '.join(TARGETS)}, "
                            f"or the HF names {', '.join(n for n in HF_TARGETS if n != 'all-linear')}, or all-linear)")
        if self.rank < 1 or self.alpha <= 0:
            raise CkptError(f"lora: rank must be >= 1 and alpha > 0 (got rank={self.rank}, alpha={self.alpha})")


@functools.cache
def _module_classes():
    # Built on first use so that reading a LoraConfig (export, merge plans) never imports torch.
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.utils import skip_init

    class LoRALinear(nn.Module):
        """y = x W^T + b + scale * dropout(x) A^T B^T, with W, b frozen and B zero at start."""

        def __init__(self, base: nn.Linear, cfg: LoraConfig, generator: torch.Generator | None):
            super().__init__()
            self.in_features, self.out_features = base.in_features, base.out_features
            self.weight = base.weight
            self.bias = base.bias
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
            self.scale = cfg.scale
            self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
            dev = base.weight.device
            # Adapters train in float32 whatever the base dtype (bf16 on GPU), as torchtune does.
            # skip_init: nn.Linear's own init would draw from the global RNG that dropout uses.
            self.lora_a = skip_init(nn.Linear, self.in_features, cfg.rank, bias=False, device=dev, dtype=torch.float32)
            self.lora_b = skip_init(nn.Linear, cfg.rank, self.out_features, bias=False, device=dev, dtype=torch.float32)
            with torch.no_grad():
                # kaiming_uniform(a=sqrt(5)) as nn.Linear and torchtune, from our own generator.
                bound = 1.0 / math.sqrt(self.in_features)
                a = torch.rand(self.lora_a.weight.shape, generator=generator, dtype=torch.float32) * 2 - 1
                self.lora_a.weight.copy_(a * bound)
                self.lora_b.weight.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = F.linear(x, self.weight, self.bias)
            return out + self.lora_b(self.lora_a(self.dropout(x))) * self.scale

    return LoRALinear


def apply_lora(model, cfg: LoraConfig, *, seed: int = 0) -> list[str]:
    """Wrap every target nn.Linear of `model` in place; freeze all non-LoRA parameters.

    Returns the wrapped module names (e.g. "layers.0.attn.q_proj")."""
    import torch
    from torch import nn

    cfg.check()
    LoRALinear = _module_classes()
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    if "output" in cfg.targets and getattr(model, "output", None) is None:
        raise CkptError("lora.targets: 'output' is tied to tok_embeddings in this model; it cannot take an adapter")
    wrapped = []
    moe = bool(getattr(getattr(model, "args", None), "n_experts", 0))
    if moe and set(cfg.targets) & set(MLP):
        log.warning("lora.targets %s: a mixture-of-experts model takes LoRA on attention and the head only; "
                    "the MLP targets are left out", [t for t in cfg.targets if t in MLP])
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in cfg.targets and isinstance(module, nn.Linear) and adaptable(name, moe):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, leaf, LoRALinear(module, cfg, gen))
            wrapped.append(name)
    if not wrapped:
        raise CkptError(f"lora.targets {cfg.targets}: no module of the model matches")
    return wrapped


def is_lora_key(key: str) -> bool:
    return key.endswith(SUFFIXES)


def lora_state_dict(model) -> dict:
    """Only the adapter tensors, in torchtune names."""
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k)}


def adapter_shapes(model_args, cfg: LoraConfig) -> dict[str, list[int]]:
    """Every adapter key a model with `model_args` gets from `cfg`, with its shape: the linear
    layers apply_lora wraps, read off the model built on the meta device (no memory, no init)."""
    import torch
    from torch import nn

    from ckptflow.model import Transformer

    with torch.device("meta"):
        model = Transformer(model_args)
    out = {}
    moe = model_args.n_experts > 0
    for module, layer in model.named_modules():
        if module.rsplit(".", 1)[-1] in cfg.targets and isinstance(layer, nn.Linear) and adaptable(module, moe):
            out[module + ".lora_a.weight"] = [cfg.rank, layer.in_features]
            out[module + ".lora_b.weight"] = [layer.out_features, cfg.rank]
    return out


def merge_lora(base_sd: dict, adapter_sd: dict, cfg: LoraConfig) -> dict:
    """A new state dict with W' = W + scale * B @ A (float32 math, cast back to W's dtype)."""
    import torch

    out = dict(base_sd)
    modules = sorted({k[: -len(s)] for k in adapter_sd for s in SUFFIXES if k.endswith(s)})
    stray = [k for k in adapter_sd if not is_lora_key(k)]
    if stray:
        raise CkptError(f"adapter key {stray[0]!r} is not a LoRA weight (…lora_a.weight / …lora_b.weight)")
    for module in modules:
        a, b = adapter_sd.get(module + ".lora_a.weight"), adapter_sd.get(module + ".lora_b.weight")
        w = base_sd.get(module + ".weight")
        if a is None or b is None:
            raise CkptError(f"adapter for {module!r} lacks lora_a or lora_b")
        if w is None:
            raise CkptError(f"adapter key {module + '.lora_a.weight'!r} has no base weight {module + '.weight'!r}")
        if tuple(b.shape) != (w.shape[0], a.shape[0]) or a.shape[1] != w.shape[1] or a.shape[0] != cfg.rank:
            raise CkptError(f"{module}: adapter shapes A{list(a.shape)} B{list(b.shape)} do not fit "
                            f"W{list(w.shape)} with rank {cfg.rank}")
        delta = b.to(torch.float32) @ a.to(torch.float32)
        out[module + ".weight"] = (w.to(torch.float32) + cfg.scale * delta).to(w.dtype)
    return out
