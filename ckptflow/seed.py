"""seed://FAMILY?key=value...: a deterministic random-init model in HF format, with a tokenizer.

After torchtitan's "seed checkpoint": the embedded default for demos and tests. The tokenizer is a
byte-level BPE trained with the `tokenizers` library on text shipped in the package, so the same
URI gives the same bytes on every machine.

    seed://llama?dim=64&n_layers=2&n_heads=4&n_kv_heads=2&hidden_dim=176&vocab_size=512&seed=0

The tokenizer learns at most ~1k tokens from the shipped text, so `vocab_size` is a ceiling; a
benchmark that needs a real vocabulary's embedding and output sizes gives `pad_vocab=128256`
(embedding rows beyond the tokenizer's, as many HF models have). `rope=llama3` adds Llama 3.1/3.2
RoPE scaling (`rope_factor`, default 32 as in Llama 3.2; low/high frequency factors 1 and 4,
original context 8192).
"""
from __future__ import annotations

import json
import logging
import os
from urllib.parse import parse_qsl, urlsplit

from ckptflow import families
from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

log = logging.getLogger(__name__)

CORPUS = os.path.join(os.path.dirname(__file__), "data", "seed_corpus.txt")
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]
DEFAULTS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "seed": 0,
            "dtype": "float32", "tie": None, "max_seq_len": 512, "rope_theta": 10000.0, "rope": "default",
            "rope_factor": 32.0}
INTS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seed", "hidden_dim", "max_seq_len", "head_dim",
        "n_experts", "n_active_experts", "moe_hidden_dim", "pad_vocab"}   # MoE families only: the three before pad_vocab
FLOATS = {"rope_theta", "rope_factor"}
ROPES = ("default", "llama3")


def parse(uri: str) -> tuple[str, dict]:
    parts = urlsplit(uri)
    if parts.scheme != "seed" or not parts.netloc:
        raise CkptError(f"{uri}: expected seed://FAMILY?key=value...")
    opts = dict(DEFAULTS)
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k not in DEFAULTS and k not in INTS:
            raise CkptError(f"{uri}: unknown seed option {k!r} (known: {', '.join(sorted(set(DEFAULTS) | INTS))})")
        try:
            opts[k] = int(v) if k in INTS else float(v) if k in FLOATS else v
        except ValueError:
            raise CkptError(f"{uri}: option {k}={v!r} is not a number") from None
    if opts["rope"] not in ROPES:
        raise CkptError(f"{uri}: rope={opts['rope']!r} is not one of {', '.join(ROPES)}")
    families.get(parts.netloc)
    return parts.netloc, opts


def model_args(family_name: str, o: dict) -> ModelArgs:
    """The seed model's args: the URI's sizes, then the family's own defaults (its SEED_ARGS constants
    and seed_args(options) for what depends on the sizes), then tie= when the URI gives it."""
    fam = families.get(family_name)
    kw = {"dim": o["dim"], "n_layers": o["n_layers"], "n_heads": o["n_heads"], "n_kv_heads": o["n_kv_heads"],
          "vocab_size": o["vocab_size"], "hidden_dim": o.get("hidden_dim") or _ffn(o["dim"]),
          "head_dim": o.get("head_dim"), "norm_eps": 1e-5, "rope_theta": o["rope_theta"],
          "rope_interleaved": fam.ROPE_INTERLEAVED, "max_seq_len": o["max_seq_len"],
          "extra": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}}
    for over in (getattr(fam, "SEED_ARGS", {}), fam.seed_args(o) if hasattr(fam, "seed_args") else {}):
        over = dict(over)
        kw["extra"] = {**kw["extra"], **over.pop("extra", {})}
        kw.update(over)
    if o["tie"] is not None:
        kw["tie_embeddings"] = o["tie"] in ("1", "true", "True")
    if o.get("rope", "default") == "llama3":
        kw["rope_scaling"] = {"rope_type": "llama3", "factor": o.get("rope_factor", 32.0), "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return ModelArgs(**kw)


def model_vocab(o: dict, tokens: int) -> int:
    """The embedding rows: the tokenizer's size, or pad_vocab when that is larger."""
    return max(tokens, o.get("pad_vocab") or 0)


def _ffn(dim: int) -> int:
    """Meta's rule: 2/3 of 4*dim, rounded up to a multiple of 16."""
    h = int(2 * 4 * dim / 3)
    return 16 * ((h + 15) // 16)


def tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([CORPUS], trainer)
    return tok


def tokenizer_files(vocab_size: int) -> tuple[dict[str, bytes], int]:
    tok = tokenizer(vocab_size)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
           "pad_token": "<|pad|>", "model_max_length": 2048, "clean_up_tokenization_spaces": False}
    files = {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": _json(cfg)}
    return files, tok.get_vocab_size()


def _json(d: dict) -> bytes:
    return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()


def init_state_dict(args: ModelArgs, seed: int, dtype: str):
    """Deterministic init in tune names: normal(0, 0.02) weights, zero biases, unit norms (stored as 0
    where norms compute x * (1 + w))."""
    import torch

    from ckptflow.model import norm_init
    from ckptflow.model_args import expected_shapes

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in expected_shapes(args).items():
        if key.endswith(".scale"):
            t = torch.full(shape, norm_init(args.norm_offset))
        elif key.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) * 0.02
        sd[key] = t.to(getattr(torch, dtype))
    return sd


FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def describe(uri: str):
    """What `ckptflow download URI DST` would write, without writing it: `ckptflow detect seed://...`."""
    from ckptflow.formats.view import Detection

    family_name, o = parse(uri)
    _, vocab = tokenizer_files(o["vocab_size"])
    args = model_args(family_name, dict(o, vocab_size=model_vocab(o, vocab)))
    return Detection("hf", uri, family_name, o["dtype"], args.num_params(), list(FILES),
                     {"seed": "generated on download (ckptflow download SOURCE DST); nothing is stored at this URI",
                      "model_args": args.to_dict()})


def write(uri: str, out) -> "object":
    """Write the seed model described by `uri` as an HF directory into Output `out`."""
    from ckptflow.formats import plan, st, view
    from ckptflow.manifest import Manifest

    family_name, o = parse(uri)
    fam = families.get(family_name)
    tok_files, vocab = tokenizer_files(o["vocab_size"])
    o["vocab_size"] = model_vocab(o, vocab)
    args = model_args(family_name, o)
    from ckptflow.families import _fused

    hf_sd = _fused.tune_state_dict_to_hf(init_state_dict(args, o["seed"], o["dtype"]), fam, args)
    items = [view.Item(k, *st.from_torch(v)[:2], load=(lambda v=v: v)) for k, v in hf_sd.items()]
    plan.write_file(out, view.FilePlan("model.safetensors", items))
    config = fam.hf_config(args, dtype=o["dtype"])
    out.put("config.json", _json(config))
    out.put("generation_config.json", _json({k: args.extra[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}))
    for name, data in tok_files.items():
        out.put(name, data)
    return Manifest(kind="source", format="hf", family=family_name, model_args=args.to_dict(), dtype=o["dtype"],
                    params={"source": uri}, lineage={"source": uri, "revision": "seed", "stages": []})
