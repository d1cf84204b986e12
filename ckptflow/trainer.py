"""The training loop: full fine-tuning or LoRA on ckptflow.model, with step checkpoints.

    trainer = Trainer(cfg, base_uri, run_uri)     # model, data, AdamW, schedule, checkpointer
    trainer.resume(step_manifest)                 # optional: weights, optimizer, schedule, data, RNG
    last = trainer.fit(until=cfg.train.steps)     # trains, evaluates, saves; the last step's manifest

One optimizer step: grad_accum micro-batches, the summed token loss divided by the step's
target count (so accumulation equals one big batch), gradient clipping, AdamW, a linear-warmup
cosine schedule that is a pure function of the step. On CUDA: bf16 autocast, pinned host
batches, CUDA RNG in the checkpoint. On CPU everything is float32, and training that resumes
from a checkpoint is bit-identical to training that never stopped: every piece of state that
shapes the next step (weights, AdamW moments and step counts, schedule offset, data position,
torch RNG) is saved, and nothing else is random. Python's global `random` is seeded at the start
but is not state: training draws nothing from it (the data order has its own seeded generator),
and other threads of the process (Prefect's services, retries) draw from it at moments no resume
can reproduce, which would make trainer_state.json differ for no effect on training.

A step checkpoint (see checkpointer.py) holds:
  model.safetensors      full weights (tune names) or only the adapter (LoRA, torchtune names)
  optimizer.safetensors  AdamW state keyed "{parameter name}.{exp_avg|exp_avg_sq|step}"
  rng.safetensors        torch CPU RNG state (and "cuda.{i}" per device)
  trainer_state.json     step, tokens seen, schedule, data position, loss
No pickle anywhere.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time

from ckptflow import config as config_mod
from ckptflow import data, manifest, progress, storage
from ckptflow.checkpointer import Checkpointer, read_tensors, step_name
from ckptflow.errors import CkptError
from ckptflow.loss import IGNORE, cross_entropy_sum
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)

MODEL, OPTIMIZER, RNG, STATE = "model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"
METRICS = "metrics.jsonl"


# ---- process-wide settings --------------------------------------------------------------

@contextlib.contextmanager
def process_settings(tcfg):
    """Thread count and deterministic algorithms for the run, restored afterwards."""
    import torch

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    if tcfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses determinism without it
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def yielding_threads(cfg, device) -> int | None:
    """The run's torch thread count when training yields one of them to an asynchronous save's
    writer (CPU, several threads, checkpoint.async and checkpoint.yield_threads), else None."""
    import torch

    ck, n = cfg.checkpoint, torch.get_num_threads()
    return n if device.type == "cpu" and ck.async_ and ck.yield_threads and n > 1 else None


def pick_device(name: str = "auto", what: str = "train.device"):
    """auto: CUDA when there is one, else the CPU; a named CUDA device that is not there is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CkptError(f"{what} {name!r}: CUDA is not available on this machine")
    return dev


def autocast_dtype(precision: str, device):
    import torch

    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# ---- the schedule ---------------------------------------------------------------------------

class Schedule:
    """Linear warmup then cosine decay to lr * min_ratio; `offset` restarts it at a later step."""

    def __init__(self, lr: float, warmup: int, total: int, min_ratio: float, offset: int = 0):
        self.lr, self.warmup, self.total, self.min_ratio, self.offset = lr, warmup, total, min_ratio, offset

    def lr_at(self, step: int) -> float:
        s, n = step - self.offset, max(self.total - self.offset, 1)
        if self.warmup and s <= self.warmup:
            return self.lr * s / self.warmup
        progress_ = min(max((s - self.warmup) / max(n - self.warmup, 1), 0.0), 1.0)
        return self.lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress_)))

    def state(self) -> dict:
        return {"offset": self.offset, "kind": "warmup_cosine"}


# ---- RNG ------------------------------------------------------------------------------------

def rng_state() -> tuple[dict, dict]:
    """(tensors, JSON) of every RNG that training draws from."""
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return tensors, {}


def set_rng_state(tensors: dict, js: dict) -> None:
    import torch

    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            log.warning("checkpoint has %d CUDA RNG states, this machine %d devices", len(cuda), torch.cuda.device_count())
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    if "python" in js:      # checkpoints written before the global Python RNG stopped being state
        version, internal, gauss = js["python"]
        random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)   # also seeds every CUDA device


# ---- model and optimizer -------------------------------------------------------------------

def lora_config(cfg):
    if cfg.train.method != "lora":
        return None
    from ckptflow.lora import LoraConfig

    return LoraConfig.from_dict(cfg.train.lora.model_dump())


def apply_knobs(model, tcfg) -> None:
    """train.activation_checkpointing and train.compile (per decoder layer, in place: the module
    names and the state dict stay as they are, so checkpoints do not change)."""
    model.checkpoint_layers = tcfg.activation_checkpointing
    if tcfg.compile:
        for layer in model.layers:
            layer.compile()


def build_model(base_uri: str, lora_cfg, *, device, seed: int, full_sd: dict | None = None):
    """The model in train mode: float32 trainable weights; a LoRA base keeps its dtype on CUDA."""
    import torch

    from ckptflow import api
    from ckptflow.lora import apply_lora
    from ckptflow.model import Transformer

    sd, view = api.load_state_dict(base_uri) if full_sd is None else (full_sd, None)
    args = view.args if view is not None else None
    if args is None:
        from ckptflow.model_args import ModelArgs

        args = ModelArgs.from_dict(manifest.require(base_uri).model_args)
    keep_base_dtype = lora_cfg is not None and device.type == "cuda"
    model = Transformer.from_state_dict(args, sd, device=device, dtype=None if keep_base_dtype else torch.float32)
    if lora_cfg is not None:
        apply_lora(model, lora_cfg, seed=seed)
    model.train()
    return model


def load_teacher(uri: str, student_args, device):
    """A frozen teacher from any readable checkpoint; it must speak the student's vocabulary."""
    import torch

    from ckptflow import api

    dtype = None if device.type == "cuda" else torch.float32
    teacher, view = api.load(uri, device=device, dtype=dtype)
    if view.args.vocab_size != student_args.vocab_size:
        raise CkptError(f"train.distill.teacher {uri}: vocabulary of {view.args.vocab_size} tokens, the student has "
                        f"{student_args.vocab_size}; distillation needs the same tokenizer")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@contextlib.contextmanager
def _no_bar():
    yield lambda *a, **k: None


def param_groups(model, weight_decay: float) -> tuple[list[dict], list[str]]:
    """AdamW groups (decay on matrices only) and the trainable parameter names in optimizer order."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append((name, p))
    groups = [{"params": [p for _, p in decay], "weight_decay": weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    names = [n for n, _ in decay] + [n for n, _ in no_decay]
    return groups, names


# ---- the trainer ------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg, base_uri: str, run_uri: str | None = None, *, on_metrics=None, full_sd: dict | None = None):
        import torch

        from ckptflow.model import moe_blocks

        self.cfg, tc = cfg, cfg.train
        self.base = manifest.require(base_uri)
        self.run_uri = run_uri or config_mod.run_dir(cfg)
        self.train_uri = storage.join(self.run_uri, "train")
        self.device = self._pick_device()
        self.amp = autocast_dtype(tc.precision, self.device)
        self.lora = lora_config(cfg)
        self.on_metrics = on_metrics
        self.model = self._build_model(full_sd)
        apply_knobs(self.model, tc)
        self.moes = moe_blocks(self.model)    # asked for their router loss every micro-batch
        groups, self.names = param_groups(self.model, tc.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        self.teacher = load_teacher(tc.distill.teacher, self.model.args, self.device) if tc.distill.teacher else None
        self.schedule = Schedule(tc.lr, tc.warmup_steps, tc.steps, tc.min_lr_ratio)
        self._load_data()
        self.step, self.tokens_seen, self.last_loss, self.metrics = 0, 0, None, []
        self.checkpointer = Checkpointer(self.train_uri, cfg.checkpoint)
        self._threads = yielding_threads(cfg, self.device)
        seed_everything(tc.seed)

    # -- hooks that the several-process trainer (distributed.py) overrides ----------------
    is_main = True          # writes metrics, progress and manifests
    world = 1               # processes that each take batch_size rows of every micro-batch

    def _pick_device(self):
        return pick_device(self.cfg.train.device)

    def _build_model(self, full_sd: dict | None):
        return build_model(self.base.uri, self.lora, device=self.device, seed=self.cfg.train.seed, full_sd=full_sd)

    def _all_sum(self, x: float) -> float:
        return x

    def _micro_batch(self):
        return self.data.next()

    def _load_data(self) -> None:
        from ckptflow.tokenizer import load_tokenizer

        cfg, tc = self.cfg, self.cfg.train
        self.tok = load_tokenizer(self.base.uri)
        pad = self.tok.pad_id if self.tok.pad_id is not None else 0
        rows = data.load_rows(cfg.data.train, self.tok, add_bos=cfg.data.add_bos, add_eos=cfg.data.add_eos)
        self.data = data.Batches(rows, batch_size=tc.batch_size, seq_len=tc.seq_len, packed=tc.packed, seed=tc.seed,
                                 pad_id=pad, where=cfg.data.train)
        self.eval_set = None
        if cfg.data.eval:
            self.eval_set = data.eval_batches(cfg.data.eval, self.tok, batch_size=tc.batch_size, seq_len=tc.seq_len,
                                              packed=tc.packed, max_batches=cfg.data.eval_batches,
                                              add_bos=cfg.data.add_bos, add_eos=cfg.data.add_eos)

    # -- one step -------------------------------------------------------------------------
    def _to_device(self, t):
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def train_step(self) -> dict:
        import torch

        from ckptflow.model import aux_loss

        tc, step = self.cfg.train, self.step + 1
        self._pace_threads()
        lr = self.schedule.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        micro = [self._micro_batch() for _ in range(tc.grad_accum)]
        # Every process divides by the targets of the whole step, so accumulation and several
        # processes add up to the loss of one big batch (FSDP averages gradients: times world).
        targets = max(self._all_sum(sum(int((lab != IGNORE).sum()) for _, lab in micro)), 1)
        total, aux_total = 0.0, None
        for tokens, labels in micro:
            tokens, labels = self._to_device(tokens), self._to_device(labels)
            loss = self._forward_loss(tokens, labels) / targets
            total += float(loss.detach())
            aux = aux_loss(self.moes)
            if aux is not None:     # MoE: + coef * router load-balancing loss, as transformers adds it
                loss = loss + aux[1] * aux[0] / len(micro)
                aux_total = (aux_total or 0.0) + float(aux[0].detach()) / len(micro)
            (loss * self.world if self.world > 1 else loss).backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm) if tc.max_grad_norm else None
        if norm is not None and hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.checkpointer.settle()      # a save in flight has its copy of what the update changes
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        n_tokens = int(self._all_sum(sum(t.numel() for t, _ in micro)))
        total = self._all_sum(total)
        self.step, self.tokens_seen, self.last_loss = step, self.tokens_seen + n_tokens, total
        row = {"step": step, "loss": total, "lr": lr, "grad_norm": float(norm) if norm is not None else None,
               "tokens": n_tokens}
        if aux_total is not None:
            row["aux_loss"] = self._all_sum(aux_total) / self.world
        return row

    def _pace_threads(self) -> None:
        """CPU training while an asynchronous save is written: one intra-op thread fewer, so the
        writer has a core of its own instead of preempting one of torch's threads (every parallel
        region would then wait for that straggler: steps ran up to 4x slower, bench/checkpoint.py).
        The count comes back at the first step boundary after the writer has handed its bytes
        to storage (Checkpointer.busy: fsyncs, uploads and the commit take no core). Only ever called
        between steps: set_num_threads is process-wide, and results of the training step do not
        depend on it (tests/test_train.py), so resume stays bit-identical."""
        import torch

        if self._threads is None:
            return
        want = self._threads - 1 if self.checkpointer.busy() else self._threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def _forward_loss(self, tokens, labels):
        """The micro-batch's summed loss; train.loss_chunk: the model computes it chunk by chunk."""
        import torch

        with torch.autocast(device_type=self.device.type, dtype=self.amp, enabled=self.amp is not None):
            if self.cfg.train.loss_chunk:
                return self.model(tokens, labels=labels, loss_chunk=self.cfg.train.loss_chunk)
            logits = self.model(tokens)
            teacher = self._teacher_logits(tokens)
        return self._loss_sum(logits, labels, teacher)

    def _teacher_logits(self, tokens):
        if self.teacher is None:
            return None
        import torch

        with torch.no_grad():
            return self.teacher(tokens)

    def _loss_sum(self, logits, labels, teacher_logits):
        """Summed token cross-entropy; with a teacher, (1 - alpha) CE + alpha T^2 KL(teacher || student)."""
        import torch.nn.functional as F

        ce = cross_entropy_sum(logits, labels)
        if teacher_logits is None:
            return ce
        d = self.cfg.train.distill
        keep = labels != IGNORE
        s = F.log_softmax(logits[keep].float() / d.temperature, dim=-1)
        t = F.log_softmax(teacher_logits[keep].float() / d.temperature, dim=-1)
        kl = F.kl_div(s, t, log_target=True, reduction="sum") * d.temperature ** 2
        return (1 - d.alpha) * ce + d.alpha * kl

    def evaluate(self) -> float | None:
        if not self.eval_set:
            return None
        return data.eval_loss(self.model, self.eval_set, device=self.device, autocast_dtype=self.amp)["loss"]

    def _eval_due(self, step: int, saving: bool) -> bool:
        every = self.cfg.train.eval_every
        return bool(self.eval_set) and (step % every == 0 if every else saving)

    # -- the loop -------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> Manifest | None:
        """Train to step `until` (default train.steps), saving on the schedule and at the end."""
        until = min(until or self.cfg.train.steps, self.cfg.train.steps)
        if self.step == 0 and self.eval_set:
            self._record({"step": 0, "loss": None, "eval_loss": self.evaluate(), "lr": None, "tokens_per_s": None,
                          "checkpoint": None})
        try:
            with (progress.bar(until, "train", unit="step") if self.is_main else _no_bar()) as bar:
                bar(self.step)
                while self.step < until:
                    bar(1, **self._one(until))
        except BaseException:
            self._abort_saves()
            raise
        last = self.checkpointer.close()
        self._pace_threads()        # no save in flight: the run's own thread count
        self.write_metrics()
        return last

    def _one(self, until: int) -> dict:
        t0 = time.perf_counter()
        row = self.train_step()
        row["tokens_per_s"] = row.pop("tokens") / max(time.perf_counter() - t0, 1e-9)
        saving = self._agree(self.checkpointer.due(self.step)) or self.step == until
        row["eval_loss"] = self.evaluate() if self._eval_due(self.step, saving) else None
        row["checkpoint"] = self.save() if saving else None
        row["tokens_seen"] = self.tokens_seen
        self._record(row)
        if saving:
            self.write_metrics()
        every = self.cfg.checkpoint.every_steps
        nxt = min(until, (self.step // every + 1) * every) if every else until
        shown = {"loss": f"{row['loss']:.4f}", "tok/s": f"{row['tokens_per_s']:.0f}", "next_ckpt": nxt}
        if row.get("aux_loss") is not None:
            shown["aux"] = f"{row['aux_loss']:.4f}"
        return shown

    def _agree(self, flag: bool) -> bool:
        return flag     # one process: no one to agree with (every_seconds may differ across ranks)

    def _record(self, row: dict) -> None:
        row["time"] = time.time()
        self.metrics.append(row)
        if self.on_metrics is not None and self.is_main:
            self.on_metrics(dict(row))

    def _abort_saves(self) -> None:
        # Let a save in flight finish: its snapshot is consistent and may be the newest state.
        try:
            self.checkpointer.close()
        except Exception:  # noqa: BLE001 - the training error is the one to report
            log.exception("a checkpoint save failed while training was being stopped")
        self._pace_threads()

    # -- saving -----------------------------------------------------------------------------
    def trainable_state(self) -> dict:
        from ckptflow.lora import lora_state_dict

        return lora_state_dict(self.model) if self.lora is not None else self.model.state_dict()

    def optimizer_state(self) -> dict:
        by_param = {id(p): n for n, p in self.model.named_parameters()}
        out = {}
        for p, s in self.optimizer.state.items():
            for field, v in s.items():
                out[f"{by_param[id(p)]}.{field}"] = v
        return out

    def save(self) -> str:
        rng_t, rng_js = rng_state()
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "lr_scheduler": self.schedule.state(),
                 "data": self.data.state(), "rng": rng_js, "loss": self.last_loss}
        tensors = {MODEL: self.trainable_state(), OPTIMIZER: self.optimizer_state(), RNG: rng_t}
        return self.checkpointer.save(self.step, tensors, {STATE: state}, self.step_manifest(), copy_later=True)

    def step_manifest(self) -> Manifest:
        cfg, base = self.cfg, self.base
        cfg_dict = config_mod.to_dict(cfg)
        cfg_dict.pop("storage_options", None)   # may hold credentials
        extra = {"lora": self.lora.to_dict() if self.lora else None, "base": base.uri,
                 "config_fingerprint": config_mod.fingerprint(cfg), "run": self.run_uri,
                 "tokens_seen": self.tokens_seen, "config": cfg_dict}
        if self.teacher is not None:
            extra["teacher"] = cfg.train.distill.teacher   # not saved: resume reloads it from here
        if self.lora is None:
            # A full step is also a readable tune directory (weights only; the tokenizer is in the base).
            extra["layout"] = [{"name": MODEL, "keys": list(self.model.state_dict())}]
            extra["original"] = base.extra.get("original")
        lineage = dict(base.lineage)
        lineage["stages"] = list(lineage.get("stages", [])) + [
            {"stage": "train", "method": cfg.train.method, "step": self.step,
             "uri": storage.join(self.train_uri, step_name(self.step))}]
        return Manifest(kind="train_state", format="tune", family=base.family, model_args=base.model_args,
                        dtype="float32", step=self.step, inputs={"base": manifest.input_ref(base)},
                        params={"method": cfg.train.method, "resume": config_mod.resume_view(cfg),
                                "resume_fingerprint": config_mod.fingerprint(cfg, "resume")},
                        lineage=lineage, extra=extra)

    def write_metrics(self) -> None:
        import json

        if not self.is_main:
            return
        body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.metrics).encode()
        storage.put_atomic(storage.join(self.train_uri, METRICS), body)

    # -- resuming ---------------------------------------------------------------------------
    def resume(self, m: Manifest, exclude: list[str] = ()) -> None:
        """Load step checkpoint `m` (already checked by check_resume); `exclude` keeps parts fresh.

        A DCP step written by several processes loads here too, as full tensors."""
        self.checkpointer.settle()      # loading changes the tensors a save in flight may still copy
        state = storage.read_json(storage.join(m.uri, STATE))
        with_optimizer = "optimizer" not in exclude
        if m.format == "dcp":
            from ckptflow import checkpointer

            weights, optim = checkpointer.read_dcp_step(m.uri, self.trainable_state(), with_optimizer)
            rng = checkpointer.rank_rng_tensors(state, 0)
        else:
            weights = read_tensors(m.uri, MODEL)
            optim = read_tensors(m.uri, OPTIMIZER) if with_optimizer else None
            rng = read_tensors(m.uri, RNG)
        self._load_weights(weights, m.uri)
        if optim is not None:
            self._load_optimizer(optim, m.uri)
        self._apply_state(state, exclude, rng)
        log.info("resumed from %s (step %d%s)", m.uri, self.step, f", fresh {', '.join(exclude)}" if exclude else "")

    def _apply_state(self, state: dict, exclude, rng: dict | None) -> None:
        self.step, self.tokens_seen, self.last_loss = int(state["step"]), int(state["tokens_seen"]), state.get("loss")
        self.schedule.offset = int(state["lr_scheduler"]["offset"]) if "lr_scheduler" not in exclude else self.step
        if "data" not in exclude:
            self.data.load_state(state["data"])
        if "rng" not in exclude and rng is not None:
            set_rng_state(rng, state["rng"])
        self.metrics = [r for r in read_metrics(self.train_uri) if r.get("step", 0) <= self.step]

    def _load_weights(self, sd: dict, where: str) -> None:
        import torch

        own = self.trainable_state()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise CkptError(f"{where}/{MODEL}: does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        with torch.no_grad():
            for k, t in own.items():
                if tuple(sd[k].shape) != tuple(t.shape):
                    raise CkptError(f"{where}/{MODEL}: {k} has shape {list(sd[k].shape)}, the model {list(t.shape)}")
                t.copy_(sd[k])

    def _load_optimizer(self, tensors: dict, where: str) -> None:
        index = {n: i for i, n in enumerate(self.names)}
        state: dict[int, dict] = {}
        for key, t in tensors.items():
            name, field = key.rsplit(".", 1)
            if name not in index:
                raise CkptError(f"{where}/{OPTIMIZER}: state for {name!r}, which this model does not train")
            state.setdefault(index[name], {})[field] = t
        sd = self.optimizer.state_dict()
        sd["state"] = state
        self.optimizer.load_state_dict(sd)


def read_metrics(train_uri: str) -> list[dict]:
    """The training loop's metrics rows (one JSON object per line, with its step); [] before training."""
    import json

    path = storage.join(train_uri, METRICS)
    if not storage.isfile(path):
        return []
    rows = []
    for line in storage.read_text(path).splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill mid-write; the next run appends after it
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


# ---- which checkpoint to resume from ------------------------------------------------------

def resume_point(cfg, train_uri: str) -> Manifest | None:
    """checkpoint.load_step (must exist), else the newest committed and verified step, else None."""
    from ckptflow import checkpointer

    if cfg.checkpoint.load_step is not None:
        return checkpointer.find(train_uri, cfg.checkpoint.load_step)
    return checkpointer.latest(train_uri)


def check_resume(m: Manifest, cfg, base: Manifest) -> None:
    """Refuse a resume whose saved state does not fit this config; name every change."""
    if m.kind != "train_state":
        raise CkptError(f"{m.uri}: a {m.kind} directory, not a training checkpoint")
    exclude = set(cfg.checkpoint.exclude_from_loading)
    saved, now = m.params.get("resume", {}), config_mod.resume_view(cfg)
    changes = []
    for key, tolerated_by in config_mod.RESUME_KEYS.items():
        if key in saved and saved[key] != now[key] and tolerated_by not in exclude:
            hint = f" (allowed with checkpoint.exclude_from_loading=[{tolerated_by}])" if tolerated_by else ""
            changes.append(f"{key} changed from {saved[key]!r} to {now[key]!r}{hint}")
    want = m.inputs.get("base", {}).get("fingerprint")
    if want and want != manifest.fingerprint(base):
        changes.append(f"the base model changed ({m.inputs['base'].get('uri')} is not what {base.uri} holds now)")
    if changes:
        raise CkptError(f"cannot resume from {m.uri}: " + "; ".join(changes)
                        + ". Use a new run_id to start over.")
