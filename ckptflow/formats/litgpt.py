"""litgpt checkpoints: lit_model.pth (a torch.save of {litgpt key: tensor}, or {"model": ...} after
`litgpt finetune`) + model_config.yaml (`asdict(litgpt.Config)`), docs/formats.md.

q, k and v are one fused tensor: `attn.qkv` = [q; k; v] on dim 0 (litgpt >= v0.5.5), or the older
`attn.attn` in KV-group order [q heads of group 0, k0, v0, q heads of group 1, ...] (<= v0.5.4).
Both are split here, lazily. litgpt's RoPE is rotate-half, so for families whose tune layout is
interleaved (llama, mistral) the q/k rows are permuted as for HF; qwen2 keeps them as they are.
`lm_head.weight` is always present in litgpt files (a copy of the embedding for tied models), so
the model is read untied. Training state beside "model" (optimizer, iter_num) and a
lit_model.pth.lora beside the weights are noted and left out.

litgpt cannot share a virtualenv with transformers 5 here: tests build these files by hand.
"""
from __future__ import annotations

import logging

from ckptflow import families, manifest, storage
from ckptflow.errors import CkptError
from ckptflow.formats import st
from ckptflow.formats.view import FilePlan, Item, is_asset

log = logging.getLogger(__name__)

LIT_MODEL, CONFIG_YAML, LORA = "lit_model.pth", "model_config.yaml", "lit_model.pth.lora"
TABLE, LEGACY_TABLE = "LITGPT_TO_TUNE", "LITGPT_LEGACY_QKV"
NOT_ASSETS = {"ckptflow.json", ".ckptflow-writing", CONFIG_YAML, "hyperparameters.yaml", "prompt_style.yaml"}
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".lora", ".distcp")


def is_litgpt(names: list[str]) -> bool:
    return LIT_MODEL in names or (LORA in names and CONFIG_YAML in names)


class Weights:
    """lit_model.pth loaded once (weights_only, mmap) while the View lives; its model dict."""

    def __init__(self, uri: str):
        self.uri = uri
        self._sd: dict | None = None
        self.left_out: list[str] = []

    def get(self) -> dict:
        if self._sd is None:
            self._sd, self.left_out = load_weights(self.uri)
        return self._sd


def load_weights(uri: str) -> tuple[dict, list[str]]:
    """({key: tensor}, [top-level entries beside "model" that were left out])."""
    import pickle

    import torch

    from ckptflow.formats import hf

    try:
        data = torch.load(hf.local_copy(uri), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CkptError(f"{uri}: not a tensors-only torch file ({first})") from e
    if not isinstance(data, dict):
        raise CkptError(f"{uri}: holds a {type(data).__name__}, not a state dict")
    left = []
    if isinstance(data.get("model"), dict):     # litgpt finetune: {"model": sd, "optimizer": ..., "iter_num": ...}
        left = [k for k in data if k != "model"]
        data = data["model"]
    bad = next((k for k, v in data.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CkptError(f"{uri}: holds a non-tensor value at key {bad!r}; only tensors are read")
    return data, left


def open_view(uri: str, *, model_config: str | None = None, **_):
    from ckptflow.formats import arch
    from ckptflow.formats.view import View
    from ckptflow.formats.tune import check_items

    uri = storage.normalize(uri)
    names = storage.listdir(uri)
    if LIT_MODEL not in names:
        raise CkptError(f"{uri}: holds only litgpt LoRA weights ({LORA}); merge them into the base first "
                        "(litgpt merge_lora), then read the merged lit_model.pth")
    cfg_uri = model_config or (storage.join(uri, CONFIG_YAML) if CONFIG_YAML in names else None)
    if cfg_uri is None:
        raise CkptError(f"{uri}: {LIT_MODEL} without {CONFIG_YAML}; give the config with --model-config")
    a = arch.load(cfg_uri)
    weights = Weights(storage.join(uri, LIT_MODEL))
    items = _items(weights, a.family, a.args)
    notes = [f"{LIT_MODEL}: {k} left out (training state)" for k in weights.left_out]
    if LORA in names:
        notes.append(f"{LORA}: litgpt LoRA weights left out (merge them with litgpt merge_lora to include them)")
    check_items([FilePlan("", list(items.values()))], a.args, uri)
    assets = {n: storage.join(uri, n) for n in names if is_asset(uri, n, NOT_ASSETS, WEIGHT_SUFFIXES)}
    return View(uri, "litgpt", a.family, a.args, items, None, assets, manifest.read(uri), notes=notes)


def _map(family, key: str, where: str):
    """(tune key | None | tuple of tune keys, legacy grouped qkv?)."""
    if ".lora_" in key:
        raise CkptError(f"{where}: {key!r} is a LoRA weight; merge the adapter (litgpt merge_lora) first")
    try:
        return families.foreign_key_to_tune(family, TABLE, key, where), False
    except families.UnknownKeyError:
        if not hasattr(family, LEGACY_TABLE):
            raise
    return families.foreign_key_to_tune(family, LEGACY_TABLE, key, where), True


def _items(weights: Weights, family, args) -> dict[str, Item]:
    sd = weights.get()
    items = {}
    for key, t in sd.items():
        target, legacy = _map(family, key, weights.uri)
        code = st.ST_NAME.get(str(t.dtype).removeprefix("torch."))
        if code is None:
            raise CkptError(f"{weights.uri}: tensor {key!r} has dtype {t.dtype}, which ckptflow does not handle")
        if target is None or (target == "output.weight" and args.tie_embeddings):
            continue
        if isinstance(target, str):
            items[target] = Item(target, code, list(t.shape), load=_whole(weights, key))
            continue
        for part, tune in enumerate(target):
            shape = [_sizes(args)[part], *t.shape[1:]]
            items[tune] = Item(tune, code, shape, load=_part(weights, key, part, args, legacy),
                               permute=_permute(family, args, tune))
    return items


def _sizes(args) -> tuple[int, int, int]:
    return args.n_heads * args.hd, args.kv_heads * args.hd, args.kv_heads * args.hd


def _permute(family, args, tune_key: str):
    """litgpt rows are rotate-half; interleaved families' q/k rows are permuted like HF's."""
    _, qk = families.tune_key_to_hf(family, tune_key)
    return ("to_tune", args.n_heads if qk == "q" else args.kv_heads) if qk else None


def _whole(weights: Weights, key: str):
    return lambda: weights.get()[key]


def _part(weights: Weights, key: str, part: int, args, legacy: bool):
    def load():
        fused = weights.get()[key]
        if legacy:
            fused = regroup(fused, args)
        q, k, v = fused.split(_sizes(args))
        return (q, k, v)[part].contiguous()
    return load


def regroup(fused, args):
    """litgpt <= v0.5.4 rows [q-group0, k0, v0, q-group1, ...] -> [q; k; v]."""
    import torch

    per = args.n_heads // args.kv_heads
    hd = args.hd
    groups = fused.reshape(args.kv_heads, (per + 2) * hd, *fused.shape[1:])
    q = groups[:, : per * hd].reshape(-1, *fused.shape[1:])
    k = groups[:, per * hd:(per + 1) * hd].reshape(-1, *fused.shape[1:])
    v = groups[:, (per + 1) * hd:].reshape(-1, *fused.shape[1:])
    return torch.cat((q, k, v))


def describe(uri: str):
    from ckptflow.formats.view import Detection, summarize

    uri = storage.normalize(uri)
    details: dict = {}
    try:
        view = open_view(uri)
    except CkptError as e:
        details["unread"] = str(e)
        return Detection("litgpt", uri, files=storage.list_files(uri), details=details)
    dtype, n = summarize((it.shape, it.dtype) for it in view.items.values())
    legacy = any(k.endswith("attn.attn.weight") for k in load_weights(storage.join(uri, LIT_MODEL))[0])
    details.update(notes=view.notes, qkv_layout="attn.attn (<= v0.5.4)" if legacy else "attn.qkv")
    return Detection("litgpt", uri, view.family.NAME, dtype, n, storage.list_files(uri), details)
