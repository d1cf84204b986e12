"""The tokenizer of a GGUF file, read from the model's own tokenizer files, and its Ollama Modelfile.

Byte-level BPE (tokenizer.json) becomes llama.cpp's `gpt2` model: tokens, token types, merges and
`tokenizer.ggml.pre`, the name of llama.cpp's pre-tokenizer. The upstream converter finds that
name by hashing the tokenizer's output on a fixed text and refuses every tokenizer it has not seen
(fine-tuned or custom ones); here it is read from tokenizer.json's own structure: its split
regexes, its byte-level step and its normalizer, matched against the literal table PRE_TOKENIZERS.
A SentencePiece tokenizer.model becomes llama.cpp's `llama` model (gguf_spm.py); it wins over
tokenizer.json, as upstream prefers it, unless it is not SentencePiece (Llama 3's tiktoken file).
Special ids, add_bos/add_eos and the chat template come from tokenizer_config.json,
generation_config.json and config.json, first found wins, as transformers reads them.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

from ckptflow import storage
from ckptflow.errors import CkptError

# The split regexes of tokenizer.json, as llama.cpp names the pre-tokenizers that implement them.
REGEXES = {
    "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen35": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "tekken": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
              r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
# The pre-tokenizer steps, canonical (see steps()) -> llama.cpp's tokenizer.ggml.pre.
PRE_TOKENIZERS = {
    ("split:gpt2", "bytelevel"): "gpt-2",
    ("split:llama3", "bytelevel"): "llama-bpe",
    ("split:qwen2", "bytelevel"): "qwen2",
    ("split:qwen35", "bytelevel"): "qwen35",
    ("split:tekken", "bytelevel"): "tekken",
    ("digits", "split:gpt2", "bytelevel"): "smollm",
}
# Normalizers llama.cpp's BPE agrees with on normalized input (Qwen's NFC) or that do nothing.
NORMALIZERS = (None, "NFC")
# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
CONFIGS = ("tokenizer_config.json", "generation_config.json", "config.json")


@dataclass
class Vocab:
    model: str                              # "gpt2" (byte-level BPE) | "llama" (SentencePiece)
    pre: str | None
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    special: dict[str, int] = field(default_factory=dict)     # bos/eos/unk/pad -> id
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def metadata(self) -> list[tuple[str, str, object]]:
        kv = [("tokenizer.ggml.model", "str", self.model)]
        if self.pre:
            kv.append(("tokenizer.ggml.pre", "str", self.pre))
        kv += [("tokenizer.ggml.tokens", "arr", self.tokens), ("tokenizer.ggml.token_type", "arr", self.types)]
        if self.scores is not None:
            kv.append(("tokenizer.ggml.scores", "arr", self.scores))
        if self.merges:
            kv.append(("tokenizer.ggml.merges", "arr", self.merges))
        names = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
        kv += [(f"tokenizer.ggml.{names[k]}", "u32", v) for k, v in self.special.items()]
        for key, value in (("add_bos_token", self.add_bos), ("add_eos_token", self.add_eos),
                           ("add_space_prefix", self.add_space_prefix)):
            if value is not None:
                kv.append((f"tokenizer.ggml.{key}", "bool", value))
        if self.chat_template:
            kv.append(("tokenizer.chat_template", "str", self.chat_template))
        return kv


def read(view) -> Vocab:
    """The tokenizer of a View, from its assets."""
    from ckptflow.formats import gguf_spm

    assets, n = view.assets, view.args.vocab_size
    configs = [_json_asset(assets, name) for name in CONFIGS]      # each file read once
    # tokenizer.json parsed at most once, and only when used (a SentencePiece model may not need it)
    tj = functools.cache(lambda: json.loads(storage.read_text(assets["tokenizer.json"]))) \
        if "tokenizer.json" in assets else None
    spm = _sentencepiece(assets, fallback=tj is not None)
    if spm is not None:
        tokens, scores, types, prefix = gguf_spm.read(spm, assets["tokenizer.model"], n, configs[0])
        vocab = Vocab("llama", "default", tokens, types, scores=scores, add_space_prefix=prefix)
    elif tj is not None:
        vocab = read_bpe(tj(), assets["tokenizer.json"], n)
    else:
        raise CkptError(f"{view.uri}: no tokenizer.json or tokenizer.model to put into the GGUF file")
    specials(vocab, assets, configs, tj)
    return vocab


def _sentencepiece(assets: dict, *, fallback: bool):
    """tokenizer.model parsed (once: gguf_spm.read takes the result), or None when there is none,
    or when it is not SentencePiece (Llama 3's tiktoken file) and tokenizer.json can stand in."""
    from ckptflow.formats import gguf_spm

    if "tokenizer.model" not in assets:
        return None
    try:
        return gguf_spm.read_model(assets["tokenizer.model"])
    except CkptError:
        if fallback:
            return None
        raise


# --- byte-level BPE -------------------------------------------------------------------------

def read_bpe(tj: dict, uri: str, n_vocab: int) -> Vocab:
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise CkptError(f"{uri}: model type {model.get('type')!r}"
                        f"{' with byte_fallback' if model.get('byte_fallback') else ''} is not byte-level BPE; "
                        "GGUF export reads byte-level BPE tokenizer.json or a SentencePiece tokenizer.model")
    pre = pre_tokenizer(tj, uri)
    if model.get("ignore_merges") and pre != "llama-bpe":
        raise CkptError(f"{uri}: model.ignore_merges is set, which llama.cpp does only for the llama-bpe pre-tokenizer")
    tokens, types = token_list(tj, n_vocab, uri)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return Vocab("gpt2", pre, tokens, types, merges)


def steps(node, where: str) -> list[str]:
    """A pre_tokenizer as canonical steps: "split:<regex name>", "digits", "bytelevel"."""
    if node is None:
        return []
    kind = node.get("type")
    if kind == "Sequence":
        return [s for p in node.get("pretokenizers", []) for s in steps(p, where)]
    if kind == "ByteLevel":
        if node.get("add_prefix_space"):
            raise CkptError(f"{where}: pre_tokenizer ByteLevel with add_prefix_space=true is not something "
                            "llama.cpp's BPE does")
        return (["split:gpt2"] if node.get("use_regex", True) else []) + ["bytelevel"]
    if kind == "Digits" and node.get("individual_digits"):
        return ["digits"]
    if kind == "Split":
        pattern = node.get("pattern") or {}
        regex = pattern.get("Regex")
        name = next((k for k, v in REGEXES.items() if v == regex), None)
        if name is None or node.get("behavior") != "Isolated" or node.get("invert"):
            shown = regex if regex is None or len(regex) < 90 else regex[:87] + "..."
            raise CkptError(f"{where}: pre_tokenizer Split regex {shown!r} (behavior {node.get('behavior')}) "
                            f"is not one llama.cpp implements (known: {', '.join(REGEXES)})")
        return [f"split:{name}"]
    raise CkptError(f"{where}: pre_tokenizer {kind!r} "
                    f"{json.dumps({k: v for k, v in node.items() if k != 'type'}, sort_keys=True)[:80]} "
                    "has no llama.cpp counterpart")


def pre_tokenizer(tj: dict, where: str) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, from its structure."""
    norm = tj.get("normalizer")
    norm_type = norm.get("type") if isinstance(norm, dict) else None
    if norm_type not in NORMALIZERS:
        raise CkptError(f"{where}: normalizer {norm_type!r} has no llama.cpp counterpart for byte-level BPE")
    found = tuple(steps(tj.get("pre_tokenizer"), where))
    decoder = (tj.get("decoder") or {}).get("type")
    if decoder != "ByteLevel":
        raise CkptError(f"{where}: decoder {decoder!r} is not ByteLevel (not a byte-level BPE tokenizer)")
    if found not in PRE_TOKENIZERS:
        raise CkptError(f"{where}: pre_tokenizer steps {list(found)} match no llama.cpp pre-tokenizer "
                        f"(known: {[list(k) for k in PRE_TOKENIZERS]})")
    return PRE_TOKENIZERS[found]


def token_list(tj: dict, n_vocab: int, where: str) -> tuple[list[str], list[int]]:
    """Tokens and their types by id, padded to the embedding's rows with [PAD{i}] (UNUSED)."""
    from ckptflow.formats import gguf_spm

    by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in (tj["model"].get("vocab") or {}).items()}
    for a in tj.get("added_tokens") or []:
        kind = CONTROL if a.get("special") or gguf_spm.looks_special(a["content"]) else USER_DEFINED
        by_id[int(a["id"])] = (a["content"], kind)
    if by_id and max(by_id) >= n_vocab:
        raise CkptError(f"{where}: token id {max(by_id)} does not fit the model's vocab_size {n_vocab}")
    pairs = [by_id.get(i, (f"[PAD{i}]", UNUSED)) for i in range(n_vocab)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# --- special tokens, add_bos, chat template --------------------------------------------------

def _json_asset(assets: dict, name: str) -> dict:
    if name not in assets:
        return {}
    try:
        d = json.loads(storage.read_text(assets[name]))
    except ValueError as e:
        raise CkptError(f"{assets[name]}: not valid JSON ({e})") from None
    return d if isinstance(d, dict) else {}


def specials(vocab: Vocab, assets: dict, configs: list[dict], tj) -> None:
    """configs: the CONFIGS files parsed ({} when absent); tj: returns tokenizer.json parsed, or None."""
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    for what in ("bos", "eos", "unk", "pad"):
        for cfg in configs:
            found = _special_id(cfg, what, ids)
            if found is not None:
                vocab.special[what] = found
                break
    tc = configs[0]
    if vocab.add_bos is None and isinstance(tc.get("add_bos_token"), bool):
        vocab.add_bos = tc["add_bos_token"]
    if vocab.add_eos is None and isinstance(tc.get("add_eos_token"), bool):
        vocab.add_eos = tc["add_eos_token"]
    if vocab.add_bos is None and tj is not None:
        vocab.add_bos = _post_processor_adds_bos(tj(), vocab.special.get("bos"))
    vocab.chat_template = _chat_template(tc, assets)


def _special_id(cfg: dict, what: str, ids: dict) -> int | None:
    value = cfg.get(f"{what}_token_id")
    if isinstance(value, list) and value:
        value = value[0]
    if isinstance(value, int):
        return value
    token = cfg.get(f"{what}_token")
    if isinstance(token, dict):
        token = token.get("content")
    return ids.get(token) if isinstance(token, str) else None


def _post_processor_adds_bos(tj: dict, bos: int | None) -> bool:
    """transformers' fast tokenizers add BOS through tokenizer.json's TemplateProcessing."""
    pp = tj.get("post_processor") or {}
    procs = pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]
    for p in procs:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            first = p["single"][0]
            if "SpecialToken" in first:
                tok = first["SpecialToken"]["id"]
                return bos is None or (p.get("special_tokens", {}).get(tok, {}).get("ids") or [None])[0] == bos
    return False


def _chat_template(tc: dict, assets: dict) -> str | None:
    if "chat_template.jinja" in assets:        # transformers >= 4.51 writes it beside the config
        return storage.read_text(assets["chat_template.jinja"])
    t = tc.get("chat_template")
    if isinstance(t, list):                    # named templates: the default one
        t = next((c.get("template") for c in t if c.get("name") == "default"), None)
    return t if isinstance(t, str) else None


# --- Ollama ---------------------------------------------------------------------------------

# Chat templates Ollama's Go templates express, recognised by their markers: (markers, TEMPLATE, stops)
OLLAMA_TEMPLATES = {
    "chatml": (("<|im_start|>", "<|im_end|>"),
               '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n', ("<|im_end|>",)),
    "llama3": (("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
               '{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n', ("<|eot_id|>",)),
}


def modelfile(gguf_name: str, vocab: Vocab) -> str:
    """An Ollama Modelfile: FROM the file, TEMPLATE where the chat template is a known simple one
    (else Ollama reads tokenizer.chat_template itself), PARAMETER stop for the end tokens."""
    lines = [f"FROM ./{gguf_name}"]
    stops: list[str] = []
    t = vocab.chat_template or ""
    for markers, template, stop in OLLAMA_TEMPLATES.values():
        if all(m in t for m in markers):
            lines.append(f'TEMPLATE """{template}"""')
            stops += stop
            break
    eos = vocab.special.get("eos")
    if eos is not None and vocab.tokens[eos] not in stops:
        stops.append(vocab.tokens[eos])
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"
