"""A SentencePiece tokenizer.model as llama.cpp's `llama` tokenizer: pieces, scores and types.

tokenizer.model is a protobuf (sentencepiece_model.proto, ModelProto); the few fields needed are
read here directly, so exporting needs neither sentencepiece nor protobuf. llama.cpp's SPM
tokenizer merges by score like SentencePiece's BPE, never collapses whitespace and applies no
normalization rule, so a model file that asks for any of those is refused, naming the field.
"""
from __future__ import annotations

import struct

from ckptflow import storage
from ckptflow.errors import CkptError

# field numbers of sentencepiece_model.proto
MODEL_PIECES, MODEL_TRAINER, MODEL_NORMALIZER = 1, 2, 3
PIECE_TEXT, PIECE_SCORE, PIECE_TYPE = 1, 2, 3
TRAINER_MODEL_TYPE = 3
NORM_NAME, NORM_ADD_DUMMY_PREFIX, NORM_REMOVE_EXTRA_WS = 1, 3, 4
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def fields(buf: bytes, where: str):
    """(field number, value) of one protobuf message: ints for varints, bytes for the rest."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i, where)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i, where)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            size, i = _varint(buf, i, where)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise CkptError(f"{where}: not a SentencePiece model (protobuf wire type {wire})")
        if i > n:
            raise CkptError(f"{where}: truncated SentencePiece model")
        yield num, value


def _varint(buf: bytes, i: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf):
            raise CkptError(f"{where}: truncated SentencePiece model")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def read_model(uri: str) -> tuple[list[tuple[str, float, int]], dict, dict]:
    """(pieces as (text, score, type), trainer spec fields, normalizer spec fields)."""
    buf = storage.read_bytes(uri)
    pieces, trainer, norm = [], {}, {}
    try:
        for num, value in fields(buf, uri):
            if num == MODEL_PIECES:
                p = dict(fields(value, uri))
                score = struct.unpack("<f", p[PIECE_SCORE])[0] if PIECE_SCORE in p else 0.0
                pieces.append((p.get(PIECE_TEXT, b"").decode("utf-8"), score, p.get(PIECE_TYPE, NORMAL)))
            elif num == MODEL_TRAINER:
                trainer = dict(fields(value, uri))
            elif num == MODEL_NORMALIZER:
                norm = dict(fields(value, uri))
    except (UnicodeDecodeError, struct.error, AttributeError) as e:
        raise CkptError(f"{uri}: not a SentencePiece model ({e})") from None
    if not pieces:
        raise CkptError(f"{uri}: holds no SentencePiece pieces (a tiktoken tokenizer.model is not supported)")
    return pieces, trainer, norm


def check(trainer: dict, norm: dict, where: str) -> bool:
    """What llama.cpp's SPM tokenizer cannot do is refused; returns add_dummy_prefix."""
    kind = MODEL_TYPES.get(trainer.get(TRAINER_MODEL_TYPE, 1), "?")
    if kind != "bpe":
        raise CkptError(f"{where}: SentencePiece model_type {kind!r}; llama.cpp's tokenizer merges like BPE")
    name = norm.get(NORM_NAME, b"nmt_nfkc").decode()
    if name != "identity":
        raise CkptError(f"{where}: SentencePiece normalizer {name!r}; llama.cpp applies none (identity)")
    if norm.get(NORM_REMOVE_EXTRA_WS, 1):
        raise CkptError(f"{where}: SentencePiece remove_extra_whitespaces is on; llama.cpp keeps every space")
    return bool(norm.get(NORM_ADD_DUMMY_PREFIX, 1))


def looks_special(text: str) -> bool:
    """Added tokens that upstream marks CONTROL although the tokenizer files do not say special."""
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def read(model: tuple, uri: str, n_vocab: int, tokenizer_config: dict) -> tuple[list[str], list[float], list[int], bool]:
    """(tokens, scores, types, add_space_prefix) of a SentencePiece tokenizer.model (`model`: what
    read_model returned for `uri`), padded to n_vocab, with the added tokens of
    tokenizer_config.json (as the upstream converter reads them)."""
    pieces, trainer, norm = model
    prefix = check(trainer, norm, uri)
    if len(pieces) > n_vocab:
        raise CkptError(f"{uri}: {len(pieces)} pieces do not fit the model's vocab_size {n_vocab}")
    tokens = [p[0] for p in pieces] + [f"[PAD{i}]" for i in range(len(pieces), n_vocab)]
    scores = [p[1] for p in pieces] + [-1000.0] * (n_vocab - len(pieces))
    types = [p[2] for p in pieces] + [UNUSED] * (n_vocab - len(pieces))
    for key, tok in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        i = int(key)
        if i >= n_vocab:
            continue
        tokens[i], scores[i] = tok["content"], -1000.0
        types[i] = CONTROL if tok.get("special") or looks_special(tok["content"]) else USER_DEFINED
    return tokens, scores, types, prefix
