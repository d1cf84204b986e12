"""The memory and speed knobs change memory and time, never the numbers.

train.activation_checkpointing (torch.utils.checkpoint per decoder layer), train.loss_chunk (the
output projection + cross-entropy chunk by chunk, each chunk recomputed in the backward) and
train.compile (torch.compile per decoder layer): loss and gradients against the same model with
the knob off (float32), and a killed run with the knobs on resumes bit-exactly.
"""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ckptflow import config, seed
from ckptflow.lora import LoraConfig, apply_lora
from ckptflow.loss import IGNORE
from ckptflow.model import Transformer
from ckptflow.stages import train as stage
from ckptflow.trainer import apply_knobs
from tests.test_train import CHILD, ROOT, base, final_hashes, make_cfg  # noqa: F401 - base is a fixture

torch.set_num_threads(1)


def tiny(uri: str, lora: bool = False, dropout: float = 0.1) -> Transformer:
    family, opts = seed.parse(uri)
    torch.manual_seed(0)
    model = Transformer(seed.model_args(family, opts))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    if lora:     # dropout on: the recomputed forward must draw the same masks
        targets = ["q_proj", "v_proj", "w2"] + (["output"] if model.output is not None else [])
        apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=dropout, targets=targets), seed=0)
    return model.train()


def batch(vocab: int, B: int = 2, T: int = 24):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, vocab, (B, T), generator=g)
    labels = torch.randint(3, vocab, (B, T), generator=g)
    labels[0, :5] = IGNORE      # prompt tokens / padding
    return tokens, labels


def loss_and_grads(model, tokens, labels, loss_chunk=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)        # the same dropout masks in both runs
    if loss_chunk is None:
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    else:
        loss = model(tokens, labels=labels, loss_chunk=loss_chunk)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b, **tol):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, **tol)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


MODELS = {"llama": "seed://llama?dim=64&n_layers=2&vocab_size=512",
          "gemma2_softcap": "seed://gemma2?dim=64&n_layers=2&vocab_size=512",
          "qwen3_moe": "seed://qwen3_moe?dim=64&n_layers=2&vocab_size=512"}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("lora", [False, True])
def test_activation_checkpointing_leaves_loss_and_gradients_unchanged(name, lora):
    model = tiny(MODELS[name], lora)
    tokens, labels = batch(model.args.vocab_size)
    off = loss_and_grads(model, tokens, labels)
    model.checkpoint_layers = True
    on = loss_and_grads(model, tokens, labels)
    # the recompute runs the same float32 kernels on the same inputs: identical on CPU
    assert_same(off, on, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gemma2_softcap"])
@pytest.mark.parametrize("chunk", [7, 16, 48, 1000])
def test_chunked_loss_leaves_loss_and_gradients_unchanged(name, chunk):
    model = tiny(MODELS[name], lora=True)
    tokens, labels = batch(model.args.vocab_size)
    off = loss_and_grads(model, tokens, labels)
    on = loss_and_grads(model, tokens, labels, loss_chunk=chunk)
    assert_same(off, on, atol=1e-6, rtol=1e-5)     # only the summation order of the chunks differs
    model.checkpoint_layers = True                  # both knobs together
    assert_same(off, loss_and_grads(model, tokens, labels, loss_chunk=chunk), atol=1e-6, rtol=1e-5)


def test_chunked_loss_never_holds_more_than_one_chunk_of_logits():
    """Every tensor saved for the backward pass is smaller than a chunk's logits times 2: the
    [N, vocab] logits (and their log-softmax) are recomputed chunk by chunk, never kept whole."""
    model = tiny("seed://llama?dim=32&n_layers=1&vocab_size=4096")
    tokens, labels = batch(4096, B=2, T=64)
    chunk, vocab = 16, model.args.vocab_size
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    for loss_chunk, limit in ((None, None), (chunk, chunk * vocab)):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens, labels=labels, loss_chunk=loss_chunk)
        loss.backward()
        if limit is None:
            assert max(saved) >= tokens.numel() * vocab       # unchunked: the whole logits are kept
        else:
            assert max(saved) <= max(limit, vocab * model.args.dim), max(saved)


def test_config_keys_are_checked():
    good = {"run_id": "r", "model": {"source": "seed://llama"}, "data": {"train": "x.jsonl"},
            "train": {"activation_checkpointing": True, "loss_chunk": 256, "compile": False}}
    t = config.validate(good).train
    assert t.activation_checkpointing and t.loss_chunk == 256 and not t.compile
    with pytest.raises(Exception, match="train.loss_chunk"):
        config.validate({**good, "train": {"loss_chunk": 0}})
    with pytest.raises(Exception, match="train.loss_chunk: .*not supported with train.distill.teacher"):
        config.validate({**good, "train": {"loss_chunk": 64, "distill": {"teacher": "/t"}}})
    with pytest.raises(Exception, match="unknown key 'train.activation_checkpoint'"):
        config.validate({**good, "train": {"activation_checkpoint": True}})


KNOBS = ("train.activation_checkpointing=true", "train.loss_chunk=40")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_with_knobs_matches_and_resumes_bit_exactly(base, tmp_path, method):  # noqa: F811
    over = (f"train.method={method}", "train.steps=6", "checkpoint.every_steps=2")
    plain = stage.run(make_cfg(tmp_path / "plain", "p", *over), base)
    ref = stage.run(make_cfg(tmp_path / "ref", "ref", *over, *KNOBS), base)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "plain" / "p" / "train" / "metrics.jsonl")]
    knob_losses = [json.loads(line)["loss"] for line in open(tmp_path / "ref" / "ref" / "train" / "metrics.jsonl")]
    assert [x for x in knob_losses if x is not None] == pytest.approx([x for x in losses if x is not None], rel=1e-5)
    cfg = make_cfg(tmp_path / "crash", "crashy", *over, *KNOBS)
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config.to_dict(cfg)), base, "step", "3"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stderr[-2000:]
    resumed = stage.run(cfg, base)
    assert resumed.step == 6 and final_hashes(resumed) == final_hashes(ref)


@pytest.mark.slow   # inductor compiles C++ on the CPU: tens of seconds
def test_compile_leaves_loss_and_gradients_unchanged():
    model = tiny(MODELS["llama"], lora=True, dropout=0.0)   # inductor draws its own dropout masks
    tokens, labels = batch(model.args.vocab_size)
    off = loss_and_grads(model, tokens, labels)
    apply_knobs(model, config.TrainConfig(compile=True))
    on = loss_and_grads(model, tokens, labels)
    assert_same(off, on, atol=2e-5, rtol=1e-4)     # fused kernels reorder float32 sums
    assert list(model.state_dict()) == list(tiny(MODELS["llama"], lora=True).state_dict())


@pytest.mark.slow   # two torchrun processes (gloo)
def test_two_processes_with_knobs_train_like_one_without(tmp_path):
    """FSDP2 wraps each layer; the layer checkpoint and the chunked loss run inside its hooks."""
    from ckptflow.checkpointer import read_dcp_step, read_tensors
    from tests import test_distributed as td
    from tests import tinyrun

    fam_base = tinyrun.seed_base(tmp_path / "base")
    two = stage.run(td.make_cfg(tmp_path, "dist", "train.nproc_per_node=2", *KNOBS), fam_base)
    one = stage.run(td.make_cfg(tmp_path, "single", "train.batch_size=4"), fam_base)
    single = read_tensors(one.uri, "model.safetensors")
    sharded, _ = read_dcp_step(two.uri, single, with_optimizer=False)
    for k in single:
        torch.testing.assert_close(sharded[k], single[k], atol=1e-5, rtol=1e-4)
