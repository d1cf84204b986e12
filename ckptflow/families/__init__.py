"""The family registry: a plain dict of family modules, and dispatch on config.json / params.json.

A family is a module (see docs/adding-a-family.md) with:
NAME, MODEL_TYPES, ROPE_INTERLEAVED, HF_TO_TUNE ({}-templated keys, None = drop),
PEFT_TARGETS (tune module -> HF module), args_from_hf(config), hf_config(args, like, dtype).
Dispatch is on config.json `model_type`, never on key or repository names. The key-mapping
helpers live in `_base` (re-exported here); family modules import `_base`/`_hf` directly, never
this package root, so there is no import cycle.
"""
from __future__ import annotations

from types import ModuleType

from ckptflow.errors import CkptError
from ckptflow.families import (gemma, gemma2, gemma3, gemma3_mm, llama, mistral, mixtral, olmo2, phi3, qwen2, qwen3,
                               qwen3_moe, smollm3)
from ckptflow.families._base import (  # noqa: F401  (re-exported: the package's public helpers)
    QK_ROWS, UnknownFamilyError, UnknownKeyError, foreign_key_to_tune, hf_dtype, hf_key_to_tune,
    hf_state_dict_to_tune, permute_hf_to_tune, permute_tune_to_hf, table, template_of,
    tune_key_to_foreign, tune_key_to_hf, tune_state_dict_to_hf)

FAMILIES: dict[str, ModuleType] = {}

REQUIRED = ("NAME", "MODEL_TYPES", "ROPE_INTERLEAVED", "HF_TO_TUNE", "PEFT_TARGETS", "args_from_hf", "hf_config")


def register(module) -> None:
    """Add a family (replacing one of the same NAME); its model_types must not clash with another's."""
    missing = [a for a in REQUIRED if not hasattr(module, a)]
    if missing:
        raise CkptError(f"family module {getattr(module, '__name__', module)!r} lacks {missing}")
    for other in FAMILIES.values():
        clash = set(other.MODEL_TYPES) & set(module.MODEL_TYPES)
        if other.NAME != module.NAME and clash:
            raise CkptError(f"family {module.NAME!r}: model_type {sorted(clash)} already belongs to {other.NAME!r}")
    FAMILIES[module.NAME] = module


def get(name: str) -> ModuleType:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownFamilyError(f"unknown model family {name!r} (known: {sorted(FAMILIES)})") from None


def for_hf_config(config: dict, where: str = "config.json") -> ModuleType:
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.MODEL_TYPES:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.MODEL_TYPES)
    raise UnknownFamilyError(f"{where}: model_type {model_type!r} is not supported (known: {known})")


def _by_structure(predicate: str, cfg: dict, where: str, what: str) -> ModuleType:
    hits = [f for f in FAMILIES.values() if hasattr(f, predicate) and getattr(f, predicate)(cfg)]
    if len(hits) != 1:
        found = " and ".join(f.NAME for f in hits) if hits else "no family"
        raise UnknownFamilyError(f"{where}: this {what} matches {found}; give the architecture another way "
                                 "(--model-config with a config.json)")
    return hits[0]


def for_meta_params(params: dict, where: str = "params.json") -> ModuleType:
    """The family of a Meta-layout params.json, by its shape (families define is_meta_params)."""
    return _by_structure("is_meta_params", params, where, "params.json")


def for_litgpt_config(cfg: dict, where: str = "model_config.yaml") -> ModuleType:
    """The family of a litgpt model_config.yaml, by its structure (families define is_litgpt_config)."""
    return _by_structure("is_litgpt_config", cfg, where, "litgpt config")


for _family in (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, gemma3_mm, smollm3, olmo2, phi3, mixtral,
                qwen3_moe):
    register(_family)
