"""torch.distributed.checkpoint directories: written by DCP itself (one process and two gloo ranks
with DTensor shards), read back exactly in one process, consolidated to HF one tensor at a time,
torchtitan step folders, fsspec, and the restricted reading of `.metadata`."""
import json
import os
import pickle
import warnings

import pytest
import torch

import ckptflow
from ckptflow import manifest, storage
from ckptflow.errors import CkptError
from ckptflow.formats import dcp, registry
from ckptflow.stages import convert
from tests import foreign, hfmodels


def _save_rank(rank: int, world: int, init_file: str, uri: str, hf_dir: str, digests_file: str) -> None:
    """One of `world` gloo ranks: shard every weight on dim 0 (DTensor) and save with dcp.save_state."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        sd, _ = ckptflow.load_state_dict(hf_dir)
        sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in sd.items()}
        state = {"model": sharded, "optimizer": {"step": torch.tensor(3)}, "step": 3}
        digests = dcp.save_state(state, uri)
        # read back in the same 2 ranks into another placement (columns): DCP reshards on load
        into = {"model": {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(v.dim() - 1)]) for k, v in sd.items()}}
        dcp.load_state(into, uri, strict=False)
        resharded = all(torch.equal(into["model"][k].full_tensor(), v) for k, v in sd.items())
        if rank == 0:
            with open(digests_file, "w") as f:
                json.dump({"digests": digests, "resharded": resharded}, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_dcp(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("dcp2")
    hf_dir = hfmodels.save("llama", str(tmp / "hf"))
    uri = str(tmp / "step-10")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.spawn(_save_rank, args=(2, str(tmp / "pg"), uri, hf_dir, str(tmp / "digests.json")), nprocs=2)
    with open(tmp / "digests.json") as f:
        return (uri, hf_dir, *json.load(f).values())


def test_two_process_save_reads_back_exactly_in_one_process(two_rank_dcp):
    uri, hf_dir, _, _ = two_rank_dcp
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(os.listdir(uri))
    md = dcp.read_metadata(uri)
    chunks = md.state_dict_metadata["model.layers.0.attn.q_proj.weight"].chunks
    assert len(chunks) == 2          # really sharded: each rank saved half the rows
    sd, view = ckptflow.load_state_dict(uri, model_config=hf_dir)
    want, _ = ckptflow.load_state_dict(hf_dir)
    assert sorted(sd) == sorted(want)
    for k, v in want.items():
        assert torch.equal(sd[k], v), k
    assert any("optimizer" in n for n in view.notes) and any("step" in n for n in view.notes)


def test_save_state_gathers_every_ranks_file_digests(two_rank_dcp):
    uri, _, digests, _ = two_rank_dcp
    assert set(digests) == {n for n in os.listdir(uri)}
    for name, d in digests.items():
        assert storage.file_digest(os.path.join(uri, name)) == d, name


def test_two_processes_load_state_into_another_sharding(two_rank_dcp):
    assert two_rank_dcp[3] is True      # rows saved, columns loaded, exactly, in both ranks


def test_dcp_to_hf_consolidates_to_the_original_bytes(two_rank_dcp, tmp_path):
    uri, hf_dir, _, _ = two_rank_dcp
    convert.run(uri, str(tmp_path / "hf"), to="hf", reader_opts={"model_config": hf_dir})
    for name in os.listdir(hf_dir):
        assert open(os.path.join(hf_dir, name), "rb").read() == open(tmp_path / "hf" / name, "rb").read(), name


def test_convert_to_dcp_and_back_is_exact_and_hashed_while_written(tmp_path):
    src = hfmodels.save("qwen2", str(tmp_path / "hf"), shard="40KB")
    m = convert.run(src, str(tmp_path / "dcp"), to="dcp")
    assert m.format == "dcp" and ".metadata" in m.files and manifest.verify(str(tmp_path / "dcp")) == []
    assert registry.sniff(str(tmp_path / "dcp")) == "dcp"
    convert.run(str(tmp_path / "dcp"), str(tmp_path / "tune"))
    convert.run(str(tmp_path / "tune"), str(tmp_path / "back"), to="hf")
    for name in os.listdir(src):
        assert open(os.path.join(src, name), "rb").read() == open(tmp_path / "back" / name, "rb").read(), name


def test_dcp_logits_equal_transformers(tmp_path):
    hf = foreign.tiny("llama")
    src = str(tmp_path / "hf")
    hf.save_pretrained(src)
    convert.run(src, str(tmp_path / "dcp"), to="dcp")
    model, view = ckptflow.load(str(tmp_path / "dcp"))
    assert view.format == "dcp"
    x = foreign.tokens()
    torch.testing.assert_close(foreign.logits(model, x), foreign.logits(hf, x), atol=foreign.ATOL, rtol=0)


def _titan(path: str, sd: dict) -> str:
    """A torchtitan step folder: model FQNs flattened at top level plus training state (docs/formats.md)."""
    import torch.distributed.checkpoint as tdcp

    state = {**sd, "optimizer": {"state": {k: torch.zeros_like(v) for k, v in list(sd.items())[:2]}},
             "lr_scheduler": {"last_epoch": 10}, "dataloader": {"position": 7}, "train_state": {"step": 10}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tdcp.save(state, checkpoint_id=path, no_dist=True)
    return path


@pytest.mark.parametrize("naming", ["meta", "titan"])
def test_torchtitan_step_is_detected_and_read_with_a_config(tmp_path, naming):
    hf = foreign.tiny("llama")
    hf.save_pretrained(str(tmp_path / "hf"))
    sd = foreign.meta_state_dict(hf)
    if naming == "titan":        # torchtitan after v0.2.2: attention.qkv_linear.w*, lm_head
        sd = {k.replace("attention.w", "attention.qkv_linear.w") if ".attention.w" in k and "wo" not in k else k: v
              for k, v in sd.items()}
        sd["lm_head.weight"] = sd.pop("output.weight")
    step = _titan(str(tmp_path / "checkpoint" / "step-10"), sd)
    d = registry.detect(step)
    assert d.format == "dcp" and d.num_params == sum(v.numel() for v in sd.values())
    assert d.details["training_state"] == ["dataloader", "lr_scheduler", "optimizer", "train_state"]
    with pytest.raises(CkptError, match="--model-config"):
        ckptflow.load(step)
    model, view = ckptflow.load(step, model_config=str(tmp_path / "hf" / "config.json"))
    x = foreign.tokens()
    torch.testing.assert_close(foreign.logits(model, x), foreign.logits(hf, x), atol=foreign.ATOL, rtol=0)
    assert len([n for n in view.notes if n.startswith("training state")]) == 4


def test_fsspec_uri_reads_and_writes(tmp_path):
    src = hfmodels.save("llama", str(tmp_path / "hf"))
    uri = "memory://ckptflow-test-dcp/out"
    try:
        convert.run(src, uri, to="dcp")
        assert registry.sniff(uri) == "dcp"
        sd, _ = ckptflow.load_state_dict(uri)
        want, _ = ckptflow.load_state_dict(src)
        assert all(torch.equal(sd[k], v) for k, v in want.items())
    finally:
        storage.remove("memory://ckptflow-test-dcp")


def test_load_state_into_preallocated_tensors(tmp_path):
    state = {"model": {"w": torch.randn(6, 4)}, "optimizer": {"m": torch.randn(3)}, "step": 5}
    uri = str(tmp_path / "s")
    digests = dcp.save_state(state, uri)
    assert set(digests) == set(os.listdir(uri))
    into = {"model": {"w": torch.zeros(6, 4)}, "optimizer": {"m": torch.zeros(3)}, "step": 0}
    dcp.load_state(into, uri)
    assert torch.equal(into["model"]["w"], state["model"]["w"]) and into["step"] == 5
    partial = {"model": {"w": torch.zeros(6, 4), "new": torch.zeros(2)}}
    with pytest.raises(CkptError, match="model.new"):
        dcp.load_state(partial, uri)
    dcp.load_state(partial, uri, strict=False)
    assert torch.equal(partial["model"]["w"], state["model"]["w"])


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_metadata_with_foreign_classes_is_not_unpickled(tmp_path):
    uri = str(tmp_path / "evil")
    os.makedirs(uri)
    with open(os.path.join(uri, ".metadata"), "wb") as f:
        pickle.dump({"x": _Boom()}, f)
    open(os.path.join(uri, "__0_0.distcp"), "wb").close()
    with pytest.raises(CkptError, match="system"):
        ckptflow.load(uri)


def test_unknown_weight_names_are_errors_not_training_state(tmp_path):
    hf = foreign.tiny("llama")
    hf.save_pretrained(str(tmp_path / "hf"))
    sd = foreign.meta_state_dict(hf)
    sd["layers.0.attention.wqkv.weight"] = sd.pop("layers.0.attention.wq.weight")
    step = _titan(str(tmp_path / "step-1"), sd)
    with pytest.raises(CkptError, match="wqkv"):
        ckptflow.load(step, model_config=str(tmp_path / "hf"))


def _status(key: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset the peak RSS")
def test_dcp_to_hf_peak_memory_follows_one_tensor_not_the_model(tmp_path):
    from bench import synth

    info = synth.write(str(tmp_path / "src"), dim=512, n_layers=16, vocab=8000, hidden=1408, heads=8,
                       kv_heads=2, dtype="float32", shard_bytes=12 * 10**6)        # ~ 200 MB of weights
    convert.run(str(tmp_path / "src"), str(tmp_path / "dcp"), to="dcp")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")            # reset VmHWM to the current RSS: measure this conversion alone
    before = _status("VmRSS:")
    convert.run(str(tmp_path / "dcp"), str(tmp_path / "hf"), to="hf")
    grown = _status("VmHWM:") - before
    largest = 8000 * 512 * 4                                   # the embedding, 16 MB
    # one tensor (read, loaded, its bytes in flight to the writer) plus slack; never the model
    assert grown < 5 * largest < info["total_bytes"] / 2, \
        f"converting grew RSS by {grown / 2**20:.0f} MB for a {info['total_bytes'] / 2**20:.0f} MB model"


def test_cli_convert_torchtitan_step_with_model_config(tmp_path, capsys):
    from ckptflow import cli

    hf = foreign.tiny("llama")
    hf.save_pretrained(str(tmp_path / "hf"))
    step = _titan(str(tmp_path / "step-5"), foreign.meta_state_dict(hf))
    out = str(tmp_path / "out")
    assert cli.main(["convert", step, out, "--to", "hf", "--model-config", str(tmp_path / "hf"), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["format"] == "hf" and any("optimizer" in n for n in m["extra"]["notes"])
    model, _ = ckptflow.load(out)
    x = foreign.tokens()
    torch.testing.assert_close(foreign.logits(model, x), foreign.logits(hf, x), atol=foreign.ATOL, rtol=0)
