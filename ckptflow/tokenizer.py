"""The model's tokenizer (tokenizer.json, the `tokenizers` library), found from any checkpoint.

    tok = load_tokenizer("runs/demo")           # a run: its base
    tok = load_tokenizer("runs/demo/train/step-000040")   # a step: its base
    ids = tok.encode("Hello")                  # no special tokens; add tok.bos_id yourself

Where tokenizer.json lives: the top of an HF directory, `assets/` of a tune directory; a step
checkpoint (or a run) points at its base. Special ids come from tokenizer_config.json,
generation_config.json or config.json, first found wins.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from ckptflow import manifest, storage
from ckptflow.errors import CkptError

log = logging.getLogger(__name__)

SPECIAL_FILES = ("tokenizer_config.json", "generation_config.json", "config.json")


@dataclass
class Tokenizer:
    tok: object                      # tokenizers.Tokenizer
    uri: str                         # the tokenizer.json it came from
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int | None = None

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (callers add BOS/EOS explicitly)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def find_tokenizer_dir(uri: str) -> str:
    """The directory holding tokenizer.json for a checkpoint, a step checkpoint or a run."""
    uri = storage.normalize(uri)
    names = storage.listdir(uri)
    if "tokenizer.json" in names:
        return uri
    if storage.isfile(storage.join(uri, "assets", "tokenizer.json")):
        return storage.join(uri, "assets")
    m = manifest.read(uri)
    base = (m.extra.get("base") if m is not None else None) or _run_base(uri, names)
    if base and storage.normalize(base) != uri:
        return find_tokenizer_dir(base)
    raise CkptError(f"{uri}: no tokenizer.json (looked at the top, assets/, and the base it was trained from)")


def _run_base(uri: str, names: list[str]) -> str | None:
    if "base" in names:
        return storage.join(uri, "base")
    if "source" in names:
        return storage.join(uri, "source")
    return None


def load_tokenizer(uri: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    where = find_tokenizer_dir(uri)
    path = storage.join(where, "tokenizer.json")
    try:
        tok = HFTokenizer.from_str(storage.read_text(path))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
        raise CkptError(f"{path}: not a tokenizer.json the tokenizers library reads ({e})") from None
    out = Tokenizer(tok, path)
    _fill_specials(out, where)
    return out


def _fill_specials(t: Tokenizer, where: str) -> None:
    for name in SPECIAL_FILES:
        path = storage.join(where, name)
        if not storage.isfile(path):
            continue
        try:
            d = json.loads(storage.read_text(path))
        except ValueError:
            log.warning("%s: not valid JSON; ignoring it for special tokens", path)
            continue
        if t.bos_id is None:
            t.bos_id = _id(t, d, "bos")
        if not t.eos_ids:
            eos = d.get("eos_token_id")
            t.eos_ids = ([int(e) for e in eos] if isinstance(eos, list) else
                         [eos] if isinstance(eos, int) else [i for i in [_id(t, d, "eos")] if i is not None])
        if t.pad_id is None:
            t.pad_id = _id(t, d, "pad")


def _id(t: Tokenizer, d: dict, what: str) -> int | None:
    """`{what}_token_id`, else `{what}_token` (a string or {"content": ...}) looked up in the vocab."""
    value = d.get(f"{what}_token_id")
    if isinstance(value, int):
        return value
    if isinstance(value, list) and value:
        return int(value[0])
    token = d.get(f"{what}_token")
    if isinstance(token, dict):
        token = token.get("content")
    return t.tok.token_to_id(token) if isinstance(token, str) else None
