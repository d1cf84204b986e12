"""The architecture of a checkpoint that does not carry one (a DCP step of torchtitan, torchtune's
.pt files without a config beside them): `--model-config` names a config.json, a params.json, a
litgpt model_config.yaml, or any model directory ckptflow reads (its config and tokenizer files
then travel with the weights, so an HF export is complete).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ckptflow import families, storage
from ckptflow.errors import CkptError


@dataclass
class Arch:
    family: object
    args: object
    assets: dict[str, str] = field(default_factory=dict)   # name -> URI (config.json, tokenizer files)
    original: dict | None = None                           # the model directory's own layout record
    uri: str = ""


def load(uri: str | Arch, *, vocab_size: int | None = None, rope_scaling_factor: float | None = None) -> Arch:
    """The architecture a config file names; an Arch as is (a model directory, which
    formats.registry.open_view reads before it calls the reader)."""
    if isinstance(uri, Arch):
        return uri
    uri = storage.normalize(uri)
    name = storage.basename(uri)
    if storage.isdir(uri):
        raise CkptError(f"{uri}: a model directory as --model-config is read through formats.registry.open_view")
    if name == "params.json":
        params = storage.read_json(uri)
        fam = families.for_meta_params(params, uri)
        args = fam.args_from_meta(params, uri, vocab_size=vocab_size, rope_factor=rope_scaling_factor)
        return Arch(fam, args, uri=uri)
    if name.endswith((".yaml", ".yml")):
        cfg = read_yaml(uri)
        fam = families.for_litgpt_config(cfg, uri)
        return Arch(fam, fam.args_from_litgpt(cfg, uri), uri=uri)
    if name.endswith(".json"):
        cfg = storage.read_json(uri)
        if not isinstance(cfg, dict):
            raise CkptError(f"{uri}: not a JSON object")
        fam = families.for_hf_config(cfg, uri)
        return Arch(fam, fam.args_from_hf(cfg, uri), {"config.json": uri}, None, uri)
    raise CkptError(f"{uri}: --model-config takes a config.json, params.json, model_config.yaml or a model directory")


def read_yaml(uri: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(storage.read_text(uri))
    except yaml.YAMLError as e:
        raise CkptError(f"{uri}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise CkptError(f"{uri}: not a mapping")
    return data
