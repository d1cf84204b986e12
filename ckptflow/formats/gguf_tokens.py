"""What a GGUF file says of its tokenizer (the Vocab), shared by the BPE and SentencePiece readers."""
from __future__ import annotations

from dataclasses import dataclass, field


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


def looks_special(text: str) -> bool:
    """Added tokens that upstream marks CONTROL although tokenizer.json does not say special."""
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")
