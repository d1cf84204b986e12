import pytest
import torch

from ckptflow.errors import CkptError
from ckptflow.lora import LoraConfig, adapter_shapes, apply_lora, lora_state_dict, merge_lora
from ckptflow.model import Transformer
from ckptflow.model_args import ModelArgs

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=176)
ALL = ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3", "output"]


def model(args=ARGS, seed=0):
    m = Transformer(args)
    m.init_weights(generator=torch.Generator().manual_seed(seed))
    return m


def tokens():
    return torch.randint(0, ARGS.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def randomize_b(m, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in lora_state_dict(m).items():
            if k.endswith("lora_b.weight"):
                v.copy_(torch.randn(v.shape, generator=g) * 0.05)


def test_adapter_starts_as_a_no_op_and_only_adapters_train():
    base = model()
    want = base(tokens())
    m = model()
    wrapped = apply_lora(m, LoraConfig(rank=4, alpha=8, targets=ALL))
    assert "layers.0.attn.q_proj" in wrapped and "output" in wrapped and len(wrapped) == 2 * 7 + 1
    assert torch.equal(m(tokens()), want)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(m)) and trainable
    assert "layers.0.attn.q_proj.weight" in m.state_dict()      # the base keeps its tune name


def test_adapter_names_and_shapes_are_torchtune_s():
    m = model()
    cfg = LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "w2"])
    apply_lora(m, cfg)
    sd = lora_state_dict(m)
    assert {k: list(v.shape) for k, v in sd.items()} == adapter_shapes(ARGS, cfg)
    assert list(sd["layers.1.attn.q_proj.lora_a.weight"].shape) == [4, 64]
    assert list(sd["layers.1.mlp.w2.lora_b.weight"].shape) == [64, 4]
    assert all(v.dtype == torch.float32 for v in sd.values())


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_matches_the_adapted_model(rslora):
    cfg = LoraConfig(rank=4, alpha=8, targets=ALL, use_rslora=rslora)
    m = model()
    base_sd = {k: v.clone() for k, v in m.state_dict().items()}
    apply_lora(m, cfg)
    randomize_b(m)
    with torch.no_grad():
        want = m(tokens())
    merged = merge_lora(base_sd, lora_state_dict(m), cfg)
    assert set(merged) == set(base_sd)
    plain = Transformer.from_state_dict(ARGS, merged)
    with torch.no_grad():
        got = plain(tokens())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)   # float32: only summation order differs
    assert cfg.scale == (8 / 2 if rslora else 8 / 4)
    assert torch.equal(merged["norm.scale"], base_sd["norm.scale"])


def test_merge_keeps_a_bf16_base_bf16_and_rounds_once():
    cfg = LoraConfig(rank=2, alpha=2, targets=["q_proj"])
    w = torch.randn(8, 6).to(torch.bfloat16)
    a, b = torch.randn(2, 6), torch.randn(8, 2)
    out = merge_lora({"layers.0.attn.q_proj.weight": w},
                     {"layers.0.attn.q_proj.lora_a.weight": a, "layers.0.attn.q_proj.lora_b.weight": b}, cfg)
    got = out["layers.0.attn.q_proj.weight"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (w.float() + 1.0 * b @ a).to(torch.bfloat16))


def test_dropout_only_while_training():
    m = model()
    apply_lora(m, LoraConfig(rank=4, alpha=8, targets=["q_proj"], dropout=0.5))
    randomize_b(m)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(tokens()), m(tokens()))
    m.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(m(tokens()), m(tokens()))


def test_init_does_not_touch_the_global_rng():
    m = model()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    apply_lora(m, LoraConfig(targets=ALL), seed=3)
    assert torch.equal(torch.get_rng_state(), before)


def test_config_round_trip_and_bad_settings():
    cfg = LoraConfig(rank=16, alpha=32, dropout=0.1, targets=["w1"], use_rslora=True)
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(CkptError, match="unknown module 'qproj'"):
        LoraConfig.from_dict({"targets": ["qproj"]})
    with pytest.raises(CkptError, match="unknown LoRA settings"):
        LoraConfig.from_dict({"r": 4})
    tied = model(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=128, hidden_dim=176, tie_embeddings=True))
    with pytest.raises(CkptError, match="tied"):
        apply_lora(tied, LoraConfig(targets=["output"]))


def test_merge_rejects_adapters_that_do_not_fit():
    cfg = LoraConfig(rank=2, alpha=2, targets=["q_proj"])
    base = {"layers.0.attn.q_proj.weight": torch.zeros(8, 6)}
    with pytest.raises(CkptError, match="do not fit"):
        merge_lora(base, {"layers.0.attn.q_proj.lora_a.weight": torch.zeros(2, 5),
                          "layers.0.attn.q_proj.lora_b.weight": torch.zeros(8, 2)}, cfg)
    with pytest.raises(CkptError, match="no base weight"):
        merge_lora(base, {"layers.9.attn.q_proj.lora_a.weight": torch.zeros(2, 6),
                          "layers.9.attn.q_proj.lora_b.weight": torch.zeros(8, 2)}, cfg)
    with pytest.raises(CkptError, match="lacks lora_a or lora_b"):
        merge_lora(base, {"layers.0.attn.q_proj.lora_a.weight": torch.zeros(2, 6)}, cfg)


def test_targets_accept_the_hf_names_peft_users_write():
    from ckptflow.lora import LoraConfig

    assert LoraConfig(targets=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]).targets == \
        ["q_proj", "output_proj", "w1", "w3", "w2"]
    assert LoraConfig(targets=["qkv_proj", "gate_up_proj", "k_proj"]).targets == ["q_proj", "k_proj", "v_proj", "w1", "w3"]
    assert LoraConfig(targets=["all-linear"]).targets == ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"]
    assert LoraConfig.from_dict({"targets": ["lm_head", "v_proj"]}).targets == ["output", "v_proj"]
    with pytest.raises(CkptError, match="'qkv' .*all-linear"):
        LoraConfig.from_dict({"targets": ["qkv"]})


def test_mixture_of_experts_takes_lora_on_attention_only():
    from ckptflow.lora import LoraConfig, adapter_shapes, apply_lora
    from ckptflow.model import Transformer
    from ckptflow.model_args import ModelArgs

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=96, n_experts=4,
                     n_active_experts=2, dense_layers=[1])
    cfg = LoraConfig(rank=2, alpha=4, targets=["all-linear"])
    wrapped = apply_lora(Transformer(args), cfg)
    assert {w.rsplit(".", 1)[-1] for w in wrapped} == {"q_proj", "k_proj", "v_proj", "output_proj"}
    assert {k.rsplit(".", 3)[-3] for k in adapter_shapes(args, cfg)} == {"q_proj", "k_proj", "v_proj", "output_proj"}
    with pytest.raises(CkptError, match="no module of the model matches"):
        apply_lora(Transformer(args), LoraConfig(targets=["w1", "w2"]))
