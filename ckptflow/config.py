"""The run configuration: one typed system (pydantic, extra="forbid"), loaded from YAML over fsspec.

    cfg = load_config("deployments/configs/demo.yaml", ["train.steps=100", "checkpoint.async=false"])

Precedence: defaults < YAML < dotted KEY=VALUE overrides, whose values are parsed as YAML
(`train.lora.targets=[q_proj,v_proj]`, `train.max_grad_norm=null`). An unknown key is an error
that names it. Relative paths (storage, data files) are relative to the working directory.
RunConfig is also the finetune flow's parameter, so a deployment gets a form in the Prefect UI.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from ckptflow import credentials, storage
from ckptflow.errors import CkptError

EXCLUDABLE = ("optimizer", "lr_scheduler", "data", "rng")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelConfig(_Strict):
    source: str = Field(description="seed://FAMILY?..., hf://ORG/NAME[@REV], any fsspec URI or local path")


class DataConfig(_Strict):
    train: str = Field(description="JSONL (`text`, or `prompt`/`response`) or plain text, any fsspec URI")
    eval: str | None = Field(None, description="held-out data in the same formats; none skips eval loss")
    eval_batches: int = Field(8, ge=1, description="at most this many held-out batches per evaluation")
    add_bos: bool = Field(True, description="start every example with the tokenizer's BOS token")
    add_eos: bool = Field(True, description="end every example with the tokenizer's EOS token")


class LoraSettings(_Strict):
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="scale numerator: alpha/r (or alpha/sqrt(r) with rsLoRA)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"],
                               description="tune module names (q_proj k_proj v_proj output_proj w1 w2 w3 output), "
                                           "the HF names peft users write (o_proj gate_proj up_proj down_proj "
                                           "qkv_proj gate_up_proj lm_head), or all-linear")
    use_rslora: bool = Field(False, description="rank-stabilised scale alpha/sqrt(r)")

    @field_validator("targets", mode="before")
    @classmethod
    def _known_targets(cls, v):
        from ckptflow.lora import LoraConfig

        targets = [v] if isinstance(v, str) else v
        if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
            try:
                LoraConfig(targets=list(targets)).check()
            except CkptError as e:      # pydantic reports a ValueError as one line naming the key
                raise ValueError(str(e).removeprefix("lora.targets: ")) from None
        return targets


class DistillConfig(_Strict):
    teacher: str | None = Field(None, description="a frozen teacher, any readable checkpoint; enables distillation")
    alpha: float = Field(0.5, ge=0, le=1, description="loss = (1 - alpha) CE + alpha T^2 KL(teacher || student)")
    temperature: float = Field(2.0, gt=0, description="softens both distributions in the KL term")


class TrainConfig(_Strict):
    method: Literal["lora", "full"] = Field("lora", description="lora: train adapters on a frozen base; full: every weight")
    steps: int = Field(60, ge=1, description="optimizer steps in total (may grow on resume)")
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch")
    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    seq_len: int = Field(256, ge=2, description="tokens per sequence (packed rows, or truncation when padded)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps before the cosine decay")
    max_grad_norm: float | None = Field(1.0, description="clip the gradient norm; null disables")
    seed: int = Field(0, description="seeds weights of new modules, dropout and the data order")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (matrices only)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    packed: bool = Field(False, description="pack examples into full rows instead of padding each one")
    nproc_per_node: int = Field(1, ge=1, description="processes; >1 launches torchrun with FSDP2 and DCP checkpoints")
    nnodes: int = Field(1, ge=1, description="machines; >1: `ckptflow train CONFIG --node-rank R` on each (c10d rendezvous)")
    rdzv_endpoint: str | None = Field(None, description="HOST:PORT of node 0's rendezvous; needed when nnodes > 1")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:N")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on CUDA, float32 on CPU")
    eval_every: int | None = Field(None, ge=1, description="held-out loss every N steps; default: at each checkpoint")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; null keeps torch's default")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms(True) for the run")
    activation_checkpointing: bool = Field(False, description="recompute each decoder layer in the backward pass "
                                                              "instead of keeping its activations (less memory, ~1/3 "
                                                              "more compute)")
    loss_chunk: int | None = Field(None, ge=1, description="output projection + cross-entropy N tokens at a time, "
                                                           "recomputed in the backward: a large vocabulary's logits "
                                                           "never exist whole; null: all at once")
    compile: bool = Field(False, description="torch.compile each decoder layer (the first steps pay the compile)")

    @field_validator("loss_chunk")
    @classmethod
    def _chunk_without_teacher(cls, v, info):
        distill = info.data.get("distill")
        if v is not None and distill is not None and distill.teacher is not None:
            raise ValueError("not supported with train.distill.teacher (distillation needs both models' full logits)")
        return v

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected HOST:PORT (node 0's address and a free port, e.g. trainer-0:29400)")
        return v

    @model_validator(mode="after")
    def _rendezvous(self):
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes: {self.nnodes} needs train.rdzv_endpoint (HOST:PORT of node 0's rendezvous)")
        return self


class CheckpointConfig(_Strict):
    every_steps: int | None = Field(50, ge=1, description="save every N steps (and at the end)")
    every_seconds: float | None = Field(None, gt=0, description="also save when this much wall time passed")
    keep_last: int | None = Field(3, ge=1, description="keep the newest K step checkpoints; null keeps all")
    keep_every: int | None = Field(None, ge=1, description="also keep steps that are multiples of M")
    pin: list[int | str] = Field(default_factory=list, description="steps kept forever: 500 or 'step-000500'")
    async_: bool = Field(True, alias="async", description="write in a background thread after a snapshot")
    yield_threads: bool = Field(True, description="CPU training with several torch threads: one fewer while an "
                                "asynchronous save is being written, so the writer has a core of its own")
    load_step: int | None = Field(None, ge=0, description="resume from this step instead of the newest")
    exclude_from_loading: list[Literal["optimizer", "lr_scheduler", "data", "rng"]] = Field(
        default_factory=list, description="resume the weights with a fresh optimizer / schedule / data position / RNG")

    @field_validator("pin")
    @classmethod
    def _pins(cls, v: list) -> list[int]:
        out = []
        for p in v:
            text = str(p).removeprefix("step-")
            if not text.isdigit():
                raise ValueError(f"pin {p!r}: expected a step number or a name like step-000500")
            out.append(int(text))
        return out


class ExportConfig(_Strict):
    format: str = Field("original", description="original | hf | meta | peft")
    dtype: str | None = Field(None, description="keep (null), or bfloat16 / float16 / float32")


class EvalConfig(_Strict):
    prompts: list[str] = Field(default_factory=lambda: ["The capital of France is"],
                               description="greedy samples written beside the eval results")
    max_new_tokens: int = Field(32, ge=1, description="tokens generated per prompt")
    tasks: list[str] = Field(default_factory=list,
                             description="lm-eval tasks run on the export and the base: names, or task YAML files / "
                                         "folders with local data (deployments/tasks); needs ckptflow[eval]")
    limit: int | None = Field(None, ge=1, description="lm-eval: at most N examples per task; null: all")
    deployment: str | None = Field(None, description="an evaluate deployment to hand eval/request.json to")


class RunConfig(_Strict):
    run_id: str = Field(description="the run directory's name under storage")
    storage: str = Field("./runs", description="any fsspec URI")
    storage_options: dict = Field(default_factory=dict, description="fsspec options for URIs under storage")
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_serializer("storage_options")
    def _no_credentials_in_json(self, value: dict, info) -> dict:
        # JSON is what Prefect stores as the flow's parameters: literal credentials never go there
        # (see ckptflow/credentials.py); to_dict(cfg, credentials=True) keeps them for a 0600 file.
        if info.mode_is_json() and not (info.context or {}).get("credentials"):
            return credentials.redacted(value)
        return value

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str) -> str:
        if not v or "/" in v or v in (".", ".."):
            raise ValueError(f"run_id {v!r} must be one path segment")
        return v


# Keys whose change breaks a resume, and which `exclude_from_loading` entry (if any) makes the
# change acceptable. The weights never fit another model or method, so those have none.
RESUME_KEYS: dict[str, str | None] = {
    "model.source": None,
    "train.method": None,
    "train.lora.rank": None,
    "train.lora.alpha": None,
    "train.lora.targets": None,
    "train.lora.use_rslora": None,
    "data.train": "data",
    "train.batch_size": "data",
    "train.seq_len": "data",
    "train.packed": "data",
    "train.grad_accum": "data",
    "train.seed": "data",
    "data.add_bos": "data",
    "data.add_eos": "data",
}


def load_config(path_or_uri: str, overrides: list[str] | None = None) -> RunConfig:
    """Defaults < YAML at `path_or_uri` < dotted overrides; one CkptError naming a bad key."""
    import yaml

    try:
        data = yaml.safe_load(storage.read_text(path_or_uri)) or {}
    except yaml.YAMLError as e:
        raise CkptError(f"{path_or_uri}: not valid YAML ({e})".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise CkptError(f"{path_or_uri}: expected a mapping at the top level")
    for item in overrides or []:
        apply_override(data, item)
    return validate(data, path_or_uri)


def apply_override(data: dict, item: str) -> None:
    import yaml

    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise CkptError(f"override {item!r}: expected KEY=VALUE with a dotted key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise CkptError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def validate(data: dict, where: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise CkptError(f"{where}: {_first_problem(e)}") from None


def _first_problem(e: ValidationError) -> str:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        known = _known_keys(RunConfig, err["loc"][:-1])
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    if err["type"] == "missing":
        return f"missing key {key!r}"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return [f.alias or name for name, f in model.model_fields.items()]


def to_dict(cfg: RunConfig, credentials: bool = False) -> dict:
    """Plain JSON-able dict with the YAML key names (checkpoint.async, not async_). Literal
    credentials in storage_options are redacted unless `credentials` (then references are
    resolved too: for a private temp file read by the ranks of this run, never for display)."""
    d = cfg.model_dump(mode="json", by_alias=True, context={"credentials": credentials})
    if credentials:
        d["storage_options"] = resolved_storage_options(cfg)
    return d


def get(cfg: RunConfig | dict, dotted: str):
    node = to_dict(cfg) if isinstance(cfg, RunConfig) else cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def resume_view(cfg: RunConfig) -> dict:
    """The values of RESUME_KEYS, stored in each step checkpoint to explain a refused resume."""
    return {k: get(cfg, k) for k in RESUME_KEYS}


def fingerprint(cfg: RunConfig, part: str = "") -> str:
    """sha256 of a part of the config ("train", "data.train", "resume"; "" for all of it)."""
    value = resume_view(cfg) if part == "resume" else (get(cfg, part) if part else to_dict(cfg))
    body = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(body).hexdigest()


def run_dir(cfg: RunConfig) -> str:
    return storage.join(storage.normalize(cfg.storage), cfg.run_id)


def resolved_storage_options(cfg: RunConfig) -> dict:
    """storage_options with credential references ({"env": ...}, {"secret": ...}) resolved."""
    return credentials.resolve(cfg.storage_options)


def apply_storage_options(cfg: RunConfig) -> None:
    """Register storage_options (references resolved) for every URI under cfg.storage."""
    if cfg.storage_options:
        storage.set_options(storage.normalize(cfg.storage), resolved_storage_options(cfg))
