"""Training and held-out data: JSONL or plain text over fsspec, tokenized, packed or padded.

    examples = read_examples("data/train.jsonl")       # {"text": ...} or {"prompt", "response"}
    rows = tokenize(examples, tok)                      # (ids, loss mask) per example
    stream = Batches(rows, batch_size=8, seq_len=256, packed=True, seed=0, pad_id=0)
    tokens, labels = stream.next()                      # labels are -100 where no loss is taken
    state = stream.state(); stream.load_state(state)    # the data position, plain JSON

The order is a pure function of (seed, epoch): epoch e shuffles the examples with
random.Random(seed * 1_000_003 + e), so the data position is just {epoch, index, seed} and a
resumed run sees exactly the batches the uninterrupted run would have seen.

Packed rows are windows of seq_len + 1 tokens cut from the concatenated examples (stride
seq_len, so every token but the first is a label once); attention is not masked across
example boundaries. Padded rows are single examples, truncated to seq_len + 1 tokens and
padded to the longest row of their batch. With prompt/response examples the loss is taken on
the response (and EOS) only.
"""
from __future__ import annotations

import json
import logging
import random

from ckptflow import storage
from ckptflow.errors import CkptError
from ckptflow.loss import IGNORE, cross_entropy_sum

log = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


def read_examples(uri: str) -> list[dict]:
    """Examples as dicts with "text", or "prompt" and "response"."""
    text = storage.read_text(uri)
    if uri.lower().endswith(JSON_SUFFIXES):
        return _jsonl(text, uri)
    docs = [d.strip() for d in text.split("\n\n")]
    out = [{"text": d} for d in docs if d]
    if not out:
        raise CkptError(f"{uri}: no text")
    return out


def _jsonl(text: str, uri: str) -> list[dict]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise CkptError(f"{uri}:{n}: not valid JSON ({e})") from None
        out.append(_example(d, f"{uri}:{n}"))
    if not out:
        raise CkptError(f"{uri}: no examples")
    return out


def _example(d, where: str) -> dict:
    if isinstance(d, dict) and isinstance(d.get("text"), str):
        return {"text": d["text"]}
    if isinstance(d, dict) and isinstance(d.get("prompt"), str) and isinstance(d.get("response"), str):
        return {"prompt": d["prompt"], "response": d["response"]}
    keys = sorted(d) if isinstance(d, dict) else type(d).__name__
    raise CkptError(f"{where}: expected a string 'text', or strings 'prompt' and 'response' (found {keys})")


def tokenize(examples: list[dict], tok, *, add_bos: bool = True, add_eos: bool = True) -> list[tuple[list[int], list[bool]]]:
    """(token ids, loss mask) per example; mask[j] says whether token j is a training target."""
    bos = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    eos = [tok.eos_id] if add_eos and tok.eos_id is not None else []
    rows = []
    for ex in examples:
        if "text" in ex:
            ids = bos + tok.encode(ex["text"]) + eos
            mask = [False] * len(bos) + [True] * (len(ids) - len(bos))
        else:
            p, r = bos + tok.encode(ex["prompt"]), tok.encode(ex["response"]) + eos
            ids, mask = p + r, [False] * len(p) + [True] * len(r)
        rows.append((ids, mask))
    return rows


def load_rows(uri: str, tok, *, add_bos: bool = True, add_eos: bool = True):
    return tokenize(read_examples(uri), tok, add_bos=add_bos, add_eos=add_eos)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def pack(rows, order: list[int], seq_len: int) -> list[tuple[list[int], list[bool]]]:
    """Windows of seq_len + 1 tokens, stride seq_len, over the rows concatenated in `order`."""
    ids: list[int] = []
    mask: list[bool] = []
    for i in order:
        ids += rows[i][0]
        mask += rows[i][1]
    n = (len(ids) - 1) // seq_len
    return [(ids[k * seq_len:k * seq_len + seq_len + 1], mask[k * seq_len:k * seq_len + seq_len + 1]) for k in range(n)]


def collate(window_rows, pad_id: int, seq_len: int):
    """(tokens [B, T], labels [B, T]) with labels = next token, IGNORE where not a target."""
    import torch

    rows = [(ids[:seq_len + 1], m[:seq_len + 1]) for ids, m in window_rows]
    width = max(len(ids) for ids, _ in rows) - 1
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, (ids, m) in enumerate(rows):
        n = len(ids) - 1
        tokens[b, :n] = torch.tensor(ids[:-1])
        target = torch.tensor(ids[1:])
        labels[b, :n] = torch.where(torch.tensor(m[1:]), target, torch.full_like(target, IGNORE))
    return tokens, labels


class Batches:
    """An endless, deterministic stream of training batches with a resumable position."""

    def __init__(self, rows, *, batch_size: int, seq_len: int, packed: bool, seed: int, pad_id: int,
                 where: str = "data"):
        self.rows, self.batch_size, self.seq_len = rows, batch_size, seq_len
        self.packed, self.seed, self.pad_id, self.where = packed, seed, pad_id, where
        self.epoch, self.index = 0, 0
        self._epoch_rows: tuple[int, list] | None = None

    def _rows_of(self, epoch: int) -> list:
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            order = epoch_order(len(self.rows), self.seed, epoch)
            rows = pack(self.rows, order, self.seq_len) if self.packed else [self.rows[i] for i in order]
            if len(rows) < self.batch_size:
                kind = f"packed rows of {self.seq_len} tokens" if self.packed else "examples"
                raise CkptError(f"{self.where}: {len(rows)} {kind}, fewer than batch_size {self.batch_size}")
            self._epoch_rows = (epoch, rows)
        return self._epoch_rows[1]

    def next(self):
        rows = self._rows_of(self.epoch)
        if self.index + self.batch_size > len(rows):  # drop the tail: every batch is full
            self.epoch, self.index = self.epoch + 1, 0
            rows = self._rows_of(self.epoch)
        batch = rows[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return collate(batch, self.pad_id, self.seq_len)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "packed": self.packed,
                "rows": len(self.rows)}

    def load_state(self, s: dict) -> None:
        if s.get("rows") != len(self.rows) or s.get("packed") != self.packed:
            raise CkptError(f"{self.where}: the saved data position is for {s.get('rows')} examples "
                            f"(packed={s.get('packed')}), this data has {len(self.rows)} (packed={self.packed})")
        self.epoch, self.index, self.seed = int(s["epoch"]), int(s["index"]), int(s["seed"])


def eval_batches(uri: str, tok, *, batch_size: int, seq_len: int, packed: bool = False, max_batches: int | None = None,
                 add_bos: bool = True, add_eos: bool = True) -> list:
    """Held-out batches in file order (no shuffle, last batch may be short): the same every call."""
    rows = load_rows(uri, tok, add_bos=add_bos, add_eos=add_eos)
    rows = pack(rows, list(range(len(rows))), seq_len) if packed else rows
    if not rows:
        raise CkptError(f"{uri}: too little held-out text for one row of {seq_len} tokens")
    pad = tok.pad_id if tok.pad_id is not None else 0
    batches = [collate(rows[i:i + batch_size], pad, seq_len) for i in range(0, len(rows), batch_size)]
    return batches[:max_batches] if max_batches else batches


def eval_loss(model, batches, *, device=None, autocast_dtype=None) -> dict:
    """Mean token cross-entropy over `batches` (and its perplexity), model left in train mode if it was."""
    import math

    import torch

    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for tokens, labels in batches:
                with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                                    enabled=autocast_dtype is not None):
                    logits = model(tokens.to(device))
                total += float(cross_entropy_sum(logits, labels.to(device)))
                count += int((labels != IGNORE).sum())
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
