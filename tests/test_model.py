"""ckptflow.model against transformers: same weights, same logits (float32, atol 1e-5)."""
import dataclasses
import json

import pytest
import torch
import transformers
from torch import nn

from ckptflow import families
from ckptflow.errors import CkptError
from ckptflow.model import Transformer, generate
from tests.hfmodels import DENSE
from tests.test_families import to_v4, to_v5


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, intermediate_size=128)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # 16 (not 8192) so that, with head_dim 16, the scaled, kept and blended bands all occur.
               "original_max_position_embeddings": 16}
CONFIGS = {
    "llama": ("llama", {}),
    "llama3_rope": ("llama", {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}),
    "llama_linear_rope": ("llama", {"rope_scaling": {"type": "linear", "factor": 4.0}}),
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral", {"sliding_window": None}),
    "mistral_window": ("mistral", {"sliding_window": 5}),
    "qwen2": ("qwen2", {}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}),
    **DENSE,
    "qwen3_tied_bias": ("qwen3", {**DENSE["qwen3"][1], "tie_word_embeddings": True, "attention_bias": True}),
    "gemma_untied": ("gemma", {**DENSE["gemma"][1], "tie_word_embeddings": False}),
    # transformers' own 5:1 pattern (no layer_types given) over 6 layers
    "gemma3_text_5to1": ("gemma3_text", {**{k: v for k, v in DENSE["gemma3_text"][1].items() if k != "layer_types"},
                                         "num_hidden_layers": 6}),
}
ATOL = 1e-5


def hf_model(name: str):
    model_type, kw = CONFIGS[name]
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **kw})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0; perturb so their mapping matters
        for key, p in model.named_parameters():
            if "norm" in key or key.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def tune_model(config: dict, hf_sd: dict) -> Transformer:
    family = families.for_hf_config(config)
    args = family.args_from_hf(config)
    return Transformer.from_state_dict(args, families.hf_state_dict_to_tune(hf_sd, family, args)).eval()


def tokens(batch=2, length=12):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    hf = hf_model(name)
    ours = tune_model(hf.config.to_dict(), hf.state_dict())
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama3_rope", "llama_linear_rope", "qwen2_tied", *DENSE])
def test_logits_match_from_v4_and_v5_config_json(name, tmp_path):
    hf = hf_model(name)
    hf.config.torch_dtype = torch.float32
    hf.config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    x = tokens()
    with torch.no_grad():
        want = hf(x).logits
        for config in (to_v4(saved), to_v5(saved)):
            torch.testing.assert_close(tune_model(config, hf.state_dict())(x), want, atol=ATOL, rtol=0)


def test_rope_scaling_changes_logits():
    # Guards the parity test above: the llama3 scaling must actually be exercised by it.
    hf = hf_model("llama3_rope")
    config = hf.config.to_dict()
    plain = {**config, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}
    x = tokens()
    with torch.no_grad():
        diff = (tune_model(config, hf.state_dict())(x) - tune_model(plain, hf.state_dict())(x)).abs().max()
    assert diff > 1e-3


def test_interleaved_and_rotate_half_layouts_agree():
    hf = hf_model("llama")
    config = hf.config.to_dict()
    args = families.get("llama").args_from_hf(config)
    interleaved = tune_model(config, hf.state_dict())
    # Same weights renamed but left in HF row order (no permute), run with the rotate-half RoPE.
    llama = families.get("llama")
    sd = {families.hf_key_to_tune(llama, k)[0]: v for k, v in hf.state_dict().items()}
    rotate_half = Transformer.from_state_dict(dataclasses.replace(args, rope_interleaved=False), sd).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(interleaved(x), rotate_half(x), atol=ATOL, rtol=0)


def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", ["llama", "mistral_window", "qwen2_tied"])
def test_generate_with_cache_matches_no_cache_loop(name):
    hf = hf_model(name)
    model = tune_model(hf.config.to_dict(), hf.state_dict())
    prompt = [5, 17, 42, 99]
    assert generate(model, prompt, 10) == greedy_without_cache(model, prompt, 10)


@pytest.mark.parametrize("name", [*DENSE])
def test_generate_with_cache_equals_transformers_greedy(name):
    """Past the sliding window (5), so the cached sliding mask is exercised too."""
    hf = hf_model(name)
    model = tune_model(hf.config.to_dict(), hf.state_dict())
    prompt = [5, 17, 42, 99]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(model, prompt, 10) == want


# Each feature switched off in ModelArgs must move the logits of the parity configs above, so that
# their parity with transformers proves the feature (a dropped soft-cap keeps greedy tokens alike).
FEATURES = [
    ("qwen3", {"qk_norm": None}), ("gemma", {"norm_offset": False}), ("gemma", {"embed_scale": False}),
    ("gemma", {"mlp_act": "silu"}), ("gemma2", {"attn_softcap": None}), ("gemma2", {"final_softcap": None}),
    ("gemma2", {"attn_scalar": None}), ("gemma2", {"layer_types": None, "extra": {}}),
    ("gemma2", {"post_norms": False}), ("gemma3_text", {"rope_local_theta": None}),
    ("gemma3_text", {"rope_scaling": None}), ("gemma3_text", {"qk_norm": None}),
    ("gemma3_text", {"layer_types": ["full_attention"] * 2}), ("smollm3", {"no_rope_layers": None}),
    ("olmo2", {"norm_scale_f32": False, "qk_norm": None}),
]


@pytest.mark.parametrize("name, change", FEATURES, ids=[f"{n}-{'-'.join(c)}" for n, c in FEATURES])
def test_each_feature_moves_the_logits(name, change):
    hf = hf_model(name)
    config = hf.config.to_dict()
    family = families.for_hf_config(config)
    args = family.args_from_hf(config)
    sd = families.hf_state_dict_to_tune(hf.state_dict(), family, args)
    off = dataclasses.replace(args, **change)
    if "qk_norm" in change:
        sd = {k: v for k, v in sd.items() if ".q_norm." not in k and ".k_norm." not in k}
    if change.get("post_norms") is False:
        sd = {k: v for k, v in sd.items() if "_scale.scale" not in k}
    x = tokens()
    with torch.no_grad():
        diff = (tune_model(config, hf.state_dict())(x) - Transformer.from_state_dict(off, sd)(x)).abs().max()
    assert diff > 1e-3


def test_generate_stops_at_eos_and_samples_reproducibly():
    hf = hf_model("llama")
    model = tune_model(hf.config.to_dict(), hf.state_dict())
    greedy = generate(model, [1, 2, 3], 8)
    assert generate(model, [1, 2, 3], 8, eos_id=greedy[2]) == greedy[:greedy.index(greedy[2]) + 1]
    assert generate(model, [1, 2, 3], 8, eos_id=[greedy[0]]) == greedy[:1]
    # top_k=1 sampling is greedy; seeded sampling repeats itself.
    assert generate(model, [1, 2, 3], 8, temperature=0.7, top_k=1) == greedy
    seeded = [torch.Generator().manual_seed(3) for _ in range(2)]
    runs = [generate(model, [1, 2, 3], 8, temperature=1.0, generator=g) for g in seeded]
    assert runs[0] == runs[1]


def test_from_state_dict_is_strict_and_names_the_key():
    hf = hf_model("llama")
    config = hf.config.to_dict()
    family = families.for_hf_config(config)
    args = family.args_from_hf(config)
    sd = families.hf_state_dict_to_tune(hf.state_dict(), family, args)
    missing = {k: v for k, v in sd.items() if k != "layers.1.mlp.w3.weight"}
    with pytest.raises(CkptError, match=r"layers\.1\.mlp\.w3\.weight"):
        Transformer.from_state_dict(args, missing)
    with pytest.raises(CkptError, match=r"norm\.scale.*shape"):
        Transformer.from_state_dict(args, {**sd, "norm.scale": torch.ones(65)})
    with pytest.raises(CkptError, match=r"unexpected \['extra\.weight'\]"):
        Transformer.from_state_dict(args, {**sd, "extra.weight": torch.ones(1)})


def test_bf16_load_runs_close_to_float32():
    hf = hf_model("qwen2")
    config = hf.config.to_dict()
    family = families.for_hf_config(config)
    args = family.args_from_hf(config)
    sd = families.hf_state_dict_to_tune(hf.state_dict(), family, args)
    model = Transformer.from_state_dict(args, sd, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=0.1, rtol=0.05)  # bf16 has 8 mantissa bits


def test_tied_model_has_no_output_and_lora_hooks_are_plain_linears():
    args = families.get("qwen2").args_from_hf(dict(TINY, model_type="qwen2", tie_word_embeddings=True))
    model = Transformer(args)
    assert model.output is None and "output.weight" not in model.state_dict()
    untied = Transformer(dataclasses.replace(args, tie_embeddings=False))
    names = {n.rsplit(".", 1)[-1] for n, m in untied.named_modules() if type(m) is nn.Linear}
    assert names == {"q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3", "output"}


def test_init_weights_is_deterministic():
    args = families.get("llama").args_from_hf(dict(TINY, model_type="llama"))
    a, b = Transformer(args), Transformer(args)
    a.init_weights(generator=torch.Generator().manual_seed(0))
    b.init_weights(generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(a.norm.scale, torch.ones(64))


# --- fused projections, LongRoPE, partial rotary and mixtures of experts ---------------------------

NEW_FAMILIES = ["phi3", "mixtral", "qwen3_moe"]


def from_hf(hf):
    """ckptflow's model from the tensors save_pretrained writes (per-expert, fused) and its config."""
    import os
    import tempfile

    from safetensors.torch import load_file

    from ckptflow.families import _fused

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        disk = load_file(os.path.join(d, "model.safetensors"))
    config = hf.config.to_dict()
    family = families.for_hf_config(config)
    args = family.args_from_hf(config)
    return Transformer.from_state_dict(args, _fused.hf_state_dict_to_tune(disk, family, args)).eval()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_family_logits_and_greedy_match_transformers(family):
    from tests import hfmodels

    hf = hfmodels.model(family).eval()
    ours = from_hf(hf)
    x = tokens(length=17)    # past the sliding window (6) and LongRoPE's original context (8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=0)
    prompt = [5, 17, 42, 99]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(ours, prompt, 12) == want


@pytest.mark.parametrize("family, base, change", [
    ("phi3", {}, {"rope_scaling": None}),
    ("phi3", {"rope_scaling": None}, {"rope_scaling": None, "partial_rotary_factor": 1.0}),
    ("qwen3_moe", {}, {"norm_topk_prob": True}),
])
def test_each_new_feature_moves_the_logits(family, base, change):
    # Guards the parity test: the same weights under a config without the feature give other logits.
    from tests import hfmodels

    hf = hfmodels.model(family, **base).eval()
    other = hfmodels.model(family, **change).eval()
    x = tokens(length=17)
    with torch.no_grad():
        assert (from_hf(hf)(x) - from_hf(other)(x)).abs().max() > 1e-4


def test_router_aux_loss_is_transformers_load_balancing_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from ckptflow.model import aux_loss, moe_blocks
    from tests import hfmodels

    hf = hfmodels.model("mixtral")
    ours = from_hf(hf).train()
    blocks = moe_blocks(ours)
    assert len(blocks) == hf.config.num_hidden_layers
    x = tokens(length=17)
    ours(x)
    got, coef = aux_loss(blocks)
    out = hf.train()(x, output_router_logits=True)
    want = load_balancing_loss_func(out.router_logits, 4, 2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert coef == hf.config.router_aux_loss_coef and aux_loss(blocks) is None   # taken once per forward
