"""Multimodal Gemma 3 (HF model_type "gemma3", Gemma3ForConditionalGeneration): its text model only.

The language model is a gemma3_text decoder under `language_model.model.` (the released files and
what transformers 5 writes) or `model.language_model.` (the in-memory names some re-saves carry), the
head `lm_head.weight` or `language_model.lm_head.weight` (absent when tied); its config is
`text_config`, whose final_logit_softcapping Gemma3ForConditionalGeneration ignores (so do we). Left out: the SigLIP vision tower (`vision_tower.*`) and the projector
(`multi_modal_projector.*`) are dropped on import, so images cannot be fed, and nothing is written
back in this layout: a multimodal checkpoint detects, converts to tune, loads and generates text like
its gemma3_text decoder, but `hf_config` refuses to write a multimodal config.json (one clear line).
"""
from __future__ import annotations

import dataclasses

import ckptflow.families.gemma as _gemma
import ckptflow.families.gemma3 as _gemma3
from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

NAME = "gemma3"
MODEL_TYPES = ("gemma3",)
ROPE_INTERLEAVED = False

_TEXT = {hf.removeprefix("model."): tune for hf, tune in _gemma3.HF_TO_TUNE.items() if hf.startswith("model.")}
HF_TO_TUNE = {  # the later spelling wins tune -> HF: the in-memory names peft uses
    **{"language_model.model." + k: v for k, v in _TEXT.items()},
    **{"model.language_model." + k: v for k, v in _TEXT.items()},
    "language_model.lm_head.weight": "output.weight",
    "lm_head.weight": "output.weight",
}
HF_DROP_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")

# peft names modules by their in-memory path: model.language_model.layers.N.self_attn.q_proj.
PEFT_TARGETS = _gemma.PEFT_TARGETS


def text_config(config: dict, where: str) -> dict:
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise CkptError(f"{where}: a gemma3 config.json without text_config")
    text = {**text, "model_type": "gemma3_text"}
    if "tie_word_embeddings" in config:  # the multimodal config's own flag decides the head
        text["tie_word_embeddings"] = config["tie_word_embeddings"]
    return text


def args_from_hf(config: dict, where: str = "config.json") -> ModelArgs:
    # Gemma3ForConditionalGeneration never applies text_config.final_logit_softcapping (null in the
    # released models anyway); the logits are the ones it computes.
    args = _gemma3.args_from_hf(text_config(config, where), f"{where}: text_config")
    return dataclasses.replace(args, final_softcap=None)


# The HF writer refuses this family with this line (it would otherwise write the text weights under a
# multimodal config.json, and transformers would fill the missing vision tower with random weights).
HF_WRITE_REFUSED = ("gemma3: ckptflow reads only the text model of a multimodal Gemma 3 checkpoint (the vision "
                    "tower and projector are dropped), so it cannot write the multimodal layout back")


def hf_config(args: ModelArgs, like: dict | None = None, dtype: str | None = None) -> dict:
    raise CkptError(HF_WRITE_REFUSED)


# --- GGUF (llama.cpp): the text model, as gemma3_text (the vision tower is not exported) ------

GGUF_ARCH = _gemma3.GGUF_ARCH
TUNE_TO_GGUF = _gemma3.TUNE_TO_GGUF
GGUF_RULES = _gemma3.GGUF_RULES
gguf_metadata = _gemma3.gguf_metadata
