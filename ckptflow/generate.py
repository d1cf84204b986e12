"""Text from any checkpoint: an HF or tune directory, an export, a run, a step, an adapter.

    ckptflow generate SRC --prompt TEXT [--max-new-tokens N] [--temperature T] [--seed S] [--step N]

SRC resolves as `ckptflow export` resolves it (stages.export.resolve): a run means its newest
committed step, a LoRA step or adapter is merged with its base in memory (nothing is written),
a full fine-tune step takes the base's config and tokenizer. The tokenizer is the model's own
(its tokenizer.json, or the base's). Decoding uses ckptflow.model.generate, which keeps a KV
cache, so each new token costs one position, not the whole prefix again.

    loaded = load("runs/demo")
    text = complete(loaded, "The capital of France is", max_new_tokens=16)   # greedy
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ckptflow import storage
from ckptflow.errors import CkptError

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: object          # ckptflow.model.Transformer, in eval mode
    tokenizer: object      # ckptflow.tokenizer.Tokenizer
    source: object         # stages.export.Source: what SRC resolved to (view, manifest, base, run, step)

    @property
    def uri(self) -> str:
        return self.source.uri

    @property
    def step(self) -> int | None:
        return self.source.step


def load(src: str, *, step: int | None = None, base: str | None = None, device: str = "auto",
         dtype: str | None = None) -> Loaded:
    """The model at `src` (any readable checkpoint, run or step) with its tokenizer."""
    return load_source(resolve(src, step=step, base=base), device=device, dtype=dtype)


def resolve(src: str, *, step: int | None = None, base: str | None = None):
    """What `src` means (stages.export.Source), before any weight is read."""
    from ckptflow.stages import export

    return export.resolve(storage.normalize(src), step=step, base=base)


def load_source(source, *, device: str = "auto", dtype: str | None = None) -> Loaded:
    import torch

    from ckptflow.model import Transformer
    from ckptflow.trainer import pick_device

    torch_dtype = getattr(torch, dtype) if dtype else None
    sd = source.view.state_dict(torch_dtype)
    model = Transformer.from_state_dict(source.view.args, sd, device=pick_device(device, "--device"),
                                        dtype=torch_dtype)
    model.eval()
    return Loaded(model, tokenizer_for(source), source)


def tokenizer_for(source):
    """The tokenizer beside the weights (a View's tokenizer.json asset), else the base's or the run's."""
    from ckptflow.tokenizer import load_tokenizer

    for view in (source.view, source.base):
        asset = view.assets.get("tokenizer.json") if view is not None else None
        if asset:
            return load_tokenizer(storage.parent(asset))
    return load_tokenizer(source.run or source.uri)


def prompt_ids(tok, prompt: str) -> list[int]:
    """BOS + the prompt's tokens: the way training saw the start of every example."""
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
    if not ids:
        raise CkptError("--prompt: empty prompt and the tokenizer has no BOS token to start from")
    return ids


def complete(loaded: Loaded, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0) -> dict:
    """{prompt, completion, tokens}: the continuation of `prompt` (greedy when temperature is 0)."""
    import torch

    from ckptflow import model as model_mod

    if max_new_tokens < 1:
        raise CkptError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if temperature < 0:
        raise CkptError(f"--temperature {temperature}: must be >= 0")
    tok = loaded.tokenizer
    ids = prompt_ids(tok, prompt)
    limit = loaded.model.args.max_seq_len
    if limit and len(ids) + max_new_tokens > limit:
        log.warning("prompt (%d tokens) + %d new tokens exceeds the model's max_seq_len %d",
                    len(ids), max_new_tokens, limit)
    gen = torch.Generator(device=loaded.model.tok_embeddings.weight.device).manual_seed(seed)
    new = model_mod.generate(loaded.model, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                             eos_id=tok.eos_ids, generator=gen)
    return {"prompt": prompt, "completion": tok.decode(new), "tokens": len(new)}


def run(src: str, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
        seed: int = 0, step: int | None = None, base: str | None = None, device: str = "auto") -> dict:
    """Load `src` and continue `prompt`; what `ckptflow generate` prints."""
    loaded = load(src, step=step, base=base, device=device)
    out = complete(loaded, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    return {**out, "uri": loaded.uri, "step": loaded.step}
