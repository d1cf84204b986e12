"""Meta's original format: model-parallel reads, exact round trips, HF parity, the RoPE factor gap.

Meta's reference code does not install here; the fixtures are written from docs/formats.md by
tests/foreign.py (split dims, embedding split by version, KV heads replicated past n_kv_heads).
"""
import json
import os

import pytest
import torch

import ckptflow
from ckptflow import families
from ckptflow.commit import Output
from ckptflow.errors import CkptError
from ckptflow.formats import meta, registry
from ckptflow.stages import convert
from tests import foreign, hfmodels


@pytest.fixture(scope="module")
def hf():
    return foreign.tiny("llama")


@pytest.mark.parametrize("mp", [1, 2, 4])
@pytest.mark.parametrize("llama3", [True, False], ids=["llama3-rows", "llama2-columns"])
def test_logits_equal_transformers_for_any_split(tmp_path, hf, mp, llama3):
    src = foreign.write_meta(hf, str(tmp_path / "meta"), mp=mp, llama3=llama3)
    model, view = ckptflow.load(src)
    x = foreign.tokens()
    torch.testing.assert_close(foreign.logits(model, x), foreign.logits(hf, x), atol=foreign.ATOL, rtol=0)
    assert view.format == "meta" and view.args.vocab_size == 256


@pytest.mark.parametrize("mp", [2, 4])
def test_model_parallel_files_join_exactly(tmp_path, hf, mp):
    src = foreign.write_meta(hf, str(tmp_path / "meta"), mp=mp)
    sd, view = ckptflow.load_state_dict(src)
    want = foreign.tune_state_dict(hf)
    assert list(sd) == list(view.items) and sorted(sd) == sorted(want)
    for k, v in want.items():
        assert torch.equal(sd[k], v), k
    assert view.original["embedding_dim"] == 0 and len(view.original["files"]) == mp


@pytest.mark.parametrize("mp", [1, 2, 4])
def test_meta_tune_meta_is_exact(tmp_path, hf, mp):
    src = foreign.write_meta(hf, str(tmp_path / "meta"), mp=mp, llama3=(mp != 2))
    convert.run(src, str(tmp_path / "tune"))
    convert.run(str(tmp_path / "tune"), str(tmp_path / "back"), to="meta")
    back = str(tmp_path / "back")
    assert sorted(os.listdir(src)) == sorted(f for f in os.listdir(back) if f != "ckptflow.json")
    for name in os.listdir(src):
        a, b = os.path.join(src, name), os.path.join(back, name)
        if name.endswith(".pth"):
            A, B = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            assert list(A) == list(B), name
            for k in A:
                assert A[k].dtype == B[k].dtype and torch.equal(A[k], B[k]), (name, k)
        else:
            assert open(a, "rb").read() == open(b, "rb").read(), name


def test_meta_tune_hf_loads_in_transformers_with_the_same_logits(tmp_path, hf):
    import transformers

    src = foreign.write_meta(hf, str(tmp_path / "meta"), mp=2)
    convert.run(src, str(tmp_path / "tune"))
    convert.run(str(tmp_path / "tune"), str(tmp_path / "hf"), to="hf")
    names = os.listdir(tmp_path / "hf")
    assert "config.json" in names and "tokenizer.model" in names and "params.json" not in names
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ours, _ = ckptflow.load(src)
    x = foreign.tokens()
    torch.testing.assert_close(foreign.logits(loaded, x), foreign.logits(ours, x), atol=foreign.ATOL, rtol=0)


@pytest.mark.parametrize("mp", [1, 2, 4])
def test_hf_to_meta_with_any_number_of_files(tmp_path, hf, mp):
    src = hfmodels.save("llama", str(tmp_path / "hf"))
    view = registry.open_view(src)
    out = Output(str(tmp_path / "meta"))
    out.commit(meta.write_view(view, out, mp=mp))
    assert sorted(f for f in os.listdir(tmp_path / "meta") if f.endswith(".pth")) == \
        [f"consolidated.{r:02d}.pth" for r in range(mp)]
    params = json.load(open(tmp_path / "meta" / "params.json"))
    assert params["multiple_of"] and "hidden_dim" not in params
    model, back = ckptflow.load(str(tmp_path / "meta"))
    assert back.args.hidden_dim == 128 and back.args.norm_eps == hf.config.rms_norm_eps
    x = foreign.tokens()
    torch.testing.assert_close(foreign.logits(model, x), foreign.logits(hf, x), atol=foreign.ATOL, rtol=0)


def test_tied_model_gets_an_output_weight(tmp_path):
    src = hfmodels.save("llama", str(tmp_path / "hf"), tie_word_embeddings=True)
    convert.run(src, str(tmp_path / "meta"), to="meta")
    sd = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])


def _llama31(tmp_path, factor):
    """An HF model with llama3 RoPE scaling; its Meta files say only use_scaled_rope."""
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf = foreign.tiny("llama", rope_scaling=scaling, rope_theta=10000.0)
    with torch.no_grad():     # sharp attention, so that the slow RoPE frequencies show in the logits
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    return hf, foreign.write_meta(hf, str(tmp_path / f"meta{factor}"), mp=2, use_scaled_rope=True)


def test_scaled_rope_without_a_factor_is_an_error(tmp_path):
    _, src = _llama31(tmp_path, 8.0)
    with pytest.raises(CkptError, match="rope-scaling-factor"):
        ckptflow.load(src)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_scaled_rope_factor_option_matches_transformers(tmp_path, factor):
    hf, src = _llama31(tmp_path, factor)
    x = foreign.tokens(n=120)       # the factor slows only the slowest frequencies: look far
    model, view = ckptflow.load(src, rope_scaling_factor=factor)
    assert view.args.rope_scaling["factor"] == factor
    torch.testing.assert_close(foreign.logits(model, x), foreign.logits(hf, x), atol=foreign.ATOL, rtol=0)
    wrong, _ = ckptflow.load(src, rope_scaling_factor=40 - factor)
    assert (foreign.logits(wrong, x) - foreign.logits(hf, x)).abs().max() > 1e-3


def test_factor_travels_through_tune_and_the_exported_manifest(tmp_path):
    hf, src = _llama31(tmp_path, 32.0)
    convert.run(src, str(tmp_path / "tune"), reader_opts={"rope_scaling_factor": 32.0})
    convert.run(str(tmp_path / "tune"), str(tmp_path / "back"), to="meta")
    assert json.load(open(tmp_path / "back" / "params.json"))["use_scaled_rope"] is True
    model, view = ckptflow.load(str(tmp_path / "back"))       # factor from ckptflow.json
    assert view.args.rope_scaling["factor"] == 32.0
    x = foreign.tokens()
    torch.testing.assert_close(foreign.logits(model, x), foreign.logits(hf, x), atol=foreign.ATOL, rtol=0)


def test_known_models_supply_the_factor_and_context():
    llama = families.get("llama")
    base = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
            "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0}
    a = llama.args_from_meta({**base, "use_scaled_rope": True})
    assert a.rope_scaling["factor"] == 32.0 and a.hidden_dim == 8192 and a.max_seq_len == 131072
    b = llama.args_from_meta({**base, "dim": 4096, "n_layers": 32, "ffn_dim_multiplier": 1.3,
                              "multiple_of": 1024, "use_scaled_rope": True})
    assert b.rope_scaling["factor"] == 8.0 and b.hidden_dim == 14336
    assert llama.args_from_meta({**base, "use_scaled_rope": True}, rope_factor=8.0).rope_scaling["factor"] == 8.0
    with pytest.raises(CkptError, match="use_scaled_rope"):
        llama.args_from_meta({**base, "n_layers": 17, "use_scaled_rope": True})


def test_ffn_params_give_hidden_dim_back():
    from ckptflow.families import _meta

    for dim, hidden in [(64, 128), (4096, 11008), (4096, 14336), (8192, 28672), (96, 200), (2048, 8192)]:
        p = _meta.ffn_params(dim, hidden)
        assert _meta.ffn_hidden(dim, p["multiple_of"], p.get("ffn_dim_multiplier")) == hidden


def test_bad_model_parallel_sets_are_refused(tmp_path, hf):
    src = foreign.write_meta(hf, str(tmp_path / "gap"), mp=4)
    os.remove(os.path.join(src, "consolidated.02.pth"))
    with pytest.raises(CkptError, match="out of sequence"):
        ckptflow.load(src)

    src = foreign.write_meta(hf, str(tmp_path / "replica"), mp=4)
    sd = torch.load(os.path.join(src, "consolidated.01.pth"), weights_only=True)
    sd["layers.0.attention.wk.weight"] += 1          # rank 1 must hold the same KV head as rank 0
    torch.save(sd, os.path.join(src, "consolidated.01.pth"))
    with pytest.raises(CkptError, match="KV head 0"):
        ckptflow.load(src)

    src = foreign.write_meta(hf, str(tmp_path / "extra"))
    sd = torch.load(os.path.join(src, "consolidated.00.pth"), weights_only=True)
    sd["layers.0.attention.wqkv.weight"] = sd.pop("layers.0.attention.wq.weight")
    torch.save(sd, os.path.join(src, "consolidated.00.pth"))
    with pytest.raises(CkptError, match="wqkv"):
        ckptflow.load(src)


def test_rope_freqs_buffer_is_dropped_with_a_note(tmp_path, hf):
    src = foreign.write_meta(hf, str(tmp_path / "meta"), llama3=False)
    sd = torch.load(os.path.join(src, "consolidated.00.pth"), weights_only=True)
    sd["rope.freqs"] = torch.ones(8)
    torch.save(sd, os.path.join(src, "consolidated.00.pth"))
    _, view = ckptflow.load(src)
    assert "rope.freqs" not in view.items and any("rope.freqs" in n for n in view.notes)


def test_detect_reports_meta(tmp_path, hf):
    src = foreign.write_meta(hf, str(tmp_path / "meta"), mp=2)
    d = registry.detect(src)
    assert (d.format, d.family, d.dtype) == ("meta", "llama", "float32")
    assert d.num_params == sum(v.numel() for v in foreign.tune_state_dict(hf).values())
    assert d.details["model_parallel"] == 2


def test_cli_convert_takes_the_rope_scaling_factor(tmp_path, capsys):
    from ckptflow import cli, manifest

    _, src = _llama31(tmp_path, 8.0)
    dst = str(tmp_path / "tune")
    capsys.readouterr()           # transformers' own warnings while building the fixture
    assert cli.main(["convert", src, dst]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--rope-scaling-factor" in err
    assert cli.main(["convert", src, dst, "--rope-scaling-factor", "8", "--json"]) == 0
    m = manifest.read(dst)
    assert m.model_args["rope_scaling"]["factor"] == 8.0 and m.params["rope_scaling_factor"] == 8.0


@pytest.mark.parametrize("container", ["safetensors", "pth"])
def test_mistral_consolidated_files(tmp_path, container):
    """Mistral's own release: Meta key names, params.json with head_dim/hidden_dim/sliding_window."""
    from safetensors.torch import save_file

    hf = foreign.tiny("mistral", sliding_window=8)
    cfg = hf.config
    src = tmp_path / "mistral"
    src.mkdir()
    sd = foreign.meta_state_dict(hf)
    if container == "safetensors":
        save_file(sd, str(src / "consolidated.safetensors"))
    else:
        torch.save(sd, src / "consolidated.00.pth")
    (src / "params.json").write_text(json.dumps({
        "dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2,
        "norm_eps": cfg.rms_norm_eps, "sliding_window": 8, "vocab_size": 256}))
    model, view = ckptflow.load(str(src))
    assert view.family.NAME == "mistral" and view.args.extra["sliding_window"] == 8
    x = foreign.tokens(n=20)        # longer than the window
    torch.testing.assert_close(foreign.logits(model, x), foreign.logits(hf, x), atol=foreign.ATOL, rtol=0)
    convert.run(str(src), str(tmp_path / "back"), to="meta")
    again, _ = ckptflow.load(str(tmp_path / "back"))
    torch.testing.assert_close(foreign.logits(again, x), foreign.logits(hf, x), atol=foreign.ATOL, rtol=0)
