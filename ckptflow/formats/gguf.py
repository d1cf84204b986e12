"""GGUF for llama.cpp, Ollama and LM Studio: one `.gguf` file written by ckptflow itself (export only).

    ckptflow export SRC DST --format gguf [--dtype f32|f16|bf16|q8_0]

The `gguf` package (gguf-py) packs the header, the metadata and the tensor index; the tensor data
is streamed one tensor at a time through the commit protocol, so peak memory follows the largest
tensor, not the model. What llama.cpp reads: the architecture's hyper-parameters from ModelArgs,
the tensors under the names the family's TUNE_TO_GGUF table gives (families/<family>.py, with
its per-tensor rules), the llama3 `rope_freqs` factors, and the tokenizer
(ckptflow/formats/gguf_vocab.py). An Ollama `Modelfile` goes beside the file.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

from ckptflow import families, storage
from ckptflow.errors import CkptError
from ckptflow.formats import st
from ckptflow.formats.view import Item, _handle
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)

FILE = "model.gguf"
MODELFILE = "Modelfile"
DTYPES = ("f32", "f16", "bf16", "q8_0")
ALIASES = {"float32": "f32", "fp32": "f32", "F32": "f32", "float16": "f16", "fp16": "f16", "half": "f16",
           "F16": "f16", "bfloat16": "bf16", "BF16": "bf16", "q8": "q8_0", "Q8_0": "q8_0"}
# llama.cpp's general.file_type (LlamaFileType) per output dtype
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
Q8_BLOCK = 32


def dtype_name(dtype: str | None, view) -> str:
    """f32 | f16 | bf16 | q8_0 from --dtype (also float32/float16/bfloat16); None keeps the
    checkpoint's own float type."""
    if dtype in (None, "", "keep"):
        from ckptflow.formats.tune import dominant_dtype
        from ckptflow.formats.view import FilePlan

        dtype = dominant_dtype([FilePlan("-", list(view.items.values()))])
    name = ALIASES.get(dtype.removeprefix("torch."), dtype)
    if name not in DTYPES:
        raise CkptError(f"--dtype {dtype}: GGUF export writes {', '.join(DTYPES)}")
    return name


# --- the tensor plan ------------------------------------------------------------------------

@dataclass
class Tensor:
    """One GGUF tensor: tune Items concatenated on dim 0 (one, unless the family fuses), a
    family rule applied in float32, or generated data (rope_freqs)."""
    name: str
    shape: list                     # torch order (rows first)
    qtype: str                      # "F32" | "F16" | "BF16" | "Q8_0"
    sources: list[Item] = field(default_factory=list)
    rule: str | None = None
    data: object | None = None      # a float32 numpy array
    stack: bool = False             # sources stacked on a new first dim (experts), not concatenated

    @property
    def nbytes(self) -> int:
        n = math.prod(self.shape)
        if self.qtype == "Q8_0":
            return n // Q8_BLOCK * 34
        return n * {"F32": 4, "F16": 2, "BF16": 2}[self.qtype]


def qtype_for(name: str, shape: list, dtype: str) -> str:
    """llama.cpp's converter rules: 1-D tensors, norms, biases and MoE routers stay float32; Q8_0
    needs rows that are whole blocks of 32 (else F16, as upstream falls back)."""
    if len(shape) <= 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight")) or not name.endswith(".weight"):
        return "F32"
    if dtype == "q8_0":
        return "Q8_0" if shape[-1] % Q8_BLOCK == 0 else "F16"
    return dtype.upper()


def plan(view, dtype: str) -> list[Tensor]:
    """Every GGUF tensor in the order llama.cpp's converter writes them (generated ones first).
    A family's GGUF_FUSED ({GGUF template: (tune templates, ...)}) stacks tune tensors on rows;
    GGUF_EXPERTS ({GGUF template: tune template with the expert index second}) stacks a layer's
    experts into one 3-D tensor."""
    fam, args = view.family, view.args
    table = families.table(fam, "TUNE_TO_GGUF")
    fused = {part: (name, parts) for name, parts in getattr(fam, "GGUF_FUSED", {}).items() for part in parts}
    experts = {tune: name for name, tune in getattr(fam, "GGUF_EXPERTS", {}).items()}
    rules = getattr(fam, "GGUF_RULES", {})
    out = [Tensor(n, list(d.shape), "F32", data=d) for n, d in extra_tensors(args).items()]
    done: set[str] = set()
    for key, it in view.items.items():
        template = families.template_of(key)
        index = [p for p, t in zip(key.split("."), template.split(".")) if t == "{}"]
        if template in experts:
            name = experts[template].format(index[0])
            items = [view.items[template.format(index[0], e)] for e in range(args.n_experts)]
            t = Tensor(name, [len(items), *items[0].shape], "", items, stack=True)
        elif template in fused:
            name, parts = fused[template]
            name = name.format(*index)
            items = [view.items[p.format(*index)] for p in parts]
            t = Tensor(name, [sum(i.shape[0] for i in items), *items[0].shape[1:]], "", items, rules.get(template))
        else:
            if template not in table:
                raise families.UnknownKeyError(key, fam.NAME, "the GGUF table (TUNE_TO_GGUF)")
            if table[template] is None:
                continue
            t = Tensor(table[template].format(*index), list(it.shape), "", [it], rules.get(template))
        if t.name in done:
            continue
        t.qtype = qtype_for(t.name, t.shape, dtype)
        done.add(t.name)
        out.append(t)
    return out


def extra_tensors(args) -> dict:
    """Generated tensors: llama3 RoPE scaling becomes `rope_freqs.weight`, the factors llama.cpp
    divides each frequency by (the upstream converter's formula); LongRoPE its two factor lists."""
    import numpy as np

    rs = args.rope_scaling or {}
    if rs.get("rope_type") == "longrope":        # Phi-3: llama.cpp picks long or short by context size
        return {"rope_factors_long.weight": np.array(rs["long_factor"], dtype=np.float32),
                "rope_factors_short.weight": np.array(rs["short_factor"], dtype=np.float32)}
    if rs.get("rope_type") != "llama3":
        return {}
    dim, base = args.hd, args.rope_theta
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    factors = []
    for i in range(0, dim, 2):
        freq = np.float32(1.0) / np.float32(base ** (np.float32(i) / np.float32(dim)))
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": np.array(factors, dtype=np.float32)}


# --- tensor data ----------------------------------------------------------------------------

RULES = {
    # gemma's norms hold w and compute x * (1 + w); llama.cpp computes x * w
    "add_one": lambda t, a: t.float() + 1.0,
    # HF rotate-half q/k rows into the Meta order llama.cpp's `llama` architecture rotates (Mixtral)
    "meta_rows_q": lambda t, a: families.permute_hf_to_tune(t, a.n_heads),
    "meta_rows_k": lambda t, a: families.permute_hf_to_tune(t, a.kv_heads),
}


CHUNK_BYTES = 16 * 2**20     # float32 bytes converted at a time: memory stays at the source tensor


def tensor_chunks(t: Tensor, handles: dict, args=None):
    """The bytes of one tensor in its GGUF type, in pieces: source bytes as they are when nothing
    changes, else the source tensor (one copy) cast or quantized a block of rows at a time."""
    import torch

    if t.data is not None:
        yield encode(torch.from_numpy(t.data), t.qtype)
        return
    it = t.sources[0]
    if len(t.sources) == 1 and t.rule is None and it.final_dtype == t.qtype and it.info is not None \
            and it.permute is None:
        src = _handle(it.info.file, handles)
        yield from st.iter_tensor_chunks(it.info, src)
        return
    parts = [source_tensor(i, handles) for i in t.sources]
    x = torch.stack(parts) if t.stack else parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    del parts
    if t.rule is not None:
        x = RULES[t.rule](x, args)
    rows = x.shape[0] if x.dim() > 1 else 1
    step = max(1, CHUNK_BYTES // max(1, x.numel() // rows * 4))
    flat = x if x.dim() > 1 else x.reshape(1, -1)
    for r in range(0, rows, step):
        yield encode(flat[r:r + step], t.qtype)


def source_tensor(it: Item, handles: dict):
    """One tune Item as a torch tensor in its own dtype, read straight into the tensor's memory."""
    import torch

    from ckptflow.formats.view import tensor

    if it.load is not None and it.permute is None:
        return it.load()
    if it.info is None or it.permute is not None or it.final_dtype != it.dtype:
        return tensor(it, handles)
    buf = bytearray(it.info.nbytes)
    src = _handle(it.info.file, handles)
    src.seek(it.info.start)
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = src.readinto(view[got:])
        if not n:
            raise CkptError(f"{it.info.file}: truncated while reading tensor {it.info.name!r}")
        got += n
    return torch.frombuffer(buf, dtype=getattr(torch, st.TORCH_NAME[it.dtype])).reshape(it.shape) if buf else \
        torch.empty(it.shape, dtype=getattr(torch, st.TORCH_NAME[it.dtype]))


def encode(x, qtype: str) -> bytes:
    import torch

    if qtype == "F32":
        return x.float().numpy().tobytes()
    if qtype == "F16":
        return x.half().numpy().tobytes()
    if qtype == "BF16":
        return x.bfloat16().view(torch.int16).numpy().tobytes()
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(x.float().numpy(), GGMLQuantizationType.Q8_0).tobytes()


# --- metadata -------------------------------------------------------------------------------

def hparams(view, name: str, dtype: str) -> list[tuple[str, str, object]]:
    """(key, gguf value type, value) for the architecture: what llama.cpp's loader reads."""
    fam, a = view.family, view.args
    arch = fam.GGUF_ARCH
    kv = [
        ("general.name", "str", name), ("general.file_type", "u32", FILE_TYPES[dtype]),
        ("general.quantization_version", "u32", 2),
        (f"{arch}.vocab_size", "u32", a.vocab_size), (f"{arch}.context_length", "u32", a.max_seq_len),
        (f"{arch}.embedding_length", "u32", a.dim), (f"{arch}.block_count", "u32", a.n_layers),
        (f"{arch}.feed_forward_length", "u32", a.hidden_dim), (f"{arch}.attention.head_count", "u32", a.n_heads),
        (f"{arch}.attention.head_count_kv", "u32", a.kv_heads),
        (f"{arch}.attention.layer_norm_rms_epsilon", "f32", a.norm_eps),
        (f"{arch}.rope.freq_base", "f32", a.rope_theta), (f"{arch}.rope.dimension_count", "u32", getattr(a, "rotary_dim", a.hd)),
    ]
    if a.head_dim is not None:
        kv += [(f"{arch}.attention.key_length", "u32", a.hd), (f"{arch}.attention.value_length", "u32", a.hd)]
    kv += rope_scaling(a, arch, view.uri)
    if hasattr(fam, "gguf_metadata"):
        kv += [(k.format(arch=arch), typ, v) for k, typ, v in fam.gguf_metadata(a)]
    return kv


def rope_scaling(a, arch: str, where: str) -> list:
    rs = a.rope_scaling or {}
    kind = rs.get("rope_type")
    if kind in (None, "default", "llama3"):        # llama3: the rope_freqs tensor
        return []
    if kind == "linear":
        return [(f"{arch}.rope.scaling.type", "str", "linear"), (f"{arch}.rope.scaling.factor", "f32", rs["factor"])]
    if kind == "longrope":     # transformers' attention factor: sqrt(1 + ln(scale) / ln(original context))
        orig = rs["original_max_position_embeddings"]
        scale = a.max_seq_len / orig
        attn = rs.get("attention_factor") or (math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
        return [(f"{arch}.rope.scaling.attn_factor", "f32", attn),
                (f"{arch}.rope.scaling.original_context_length", "u32", orig)]
    raise CkptError(f"{where}: RoPE scaling {kind!r} has no GGUF export yet (default, linear, llama3, longrope)")


def add(writer, key: str, typ: str, value) -> None:
    {"str": writer.add_string, "u32": writer.add_uint32, "f32": writer.add_float32, "bool": writer.add_bool,
     "arr": writer.add_array}[typ](key, value)


# --- writing --------------------------------------------------------------------------------

class _Sink:
    """A commit.Output file as GGUFWriter's output stream: it only needs write() and tell()."""

    def __init__(self, f):
        self.f, self.pos = f, 0

    def write(self, data) -> int:
        data = bytes(data) if not isinstance(data, bytes) else data
        self.f.write(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass


@dataclass
class Prepared:
    """Everything about the file but the tensor data: checked before anything is written."""
    dtype: str
    tensors: list[Tensor]
    vocab: object           # gguf_vocab.Vocab
    kv: list                # (key, type, value): the architecture's metadata

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def prepare(view, dtype: str | None) -> Prepared:
    from ckptflow.formats import gguf_vocab

    if not hasattr(view.family, "GGUF_ARCH"):
        raise CkptError(f"{view.uri}: family {view.family.NAME!r} has no GGUF table yet")
    dtype = dtype_name(dtype, view)
    vocab = gguf_vocab.read(view)
    if vocab.chat_template and hasattr(view.family, "gguf_chat_template"):
        vocab.chat_template = view.family.gguf_chat_template(vocab.chat_template)
    kv = hparams(view, loadable_name(model_name(view), view, vocab), dtype)   # the family's refusals first
    return Prepared(dtype, plan(view, dtype), vocab, kv)


# llama.cpp sets attributes of these tokens (token_to_id.at: it fails to load the file without
# them) for any model whose general.name contains "phi3" or "phi-3", whatever its architecture
PHI3_NAME_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def loadable_name(name: str, view, vocab) -> str:
    """The name as is, unless it would make llama.cpp refuse the file: a "phi3" in a run or directory
    name over a vocabulary without Phi-3's special tokens (e.g. Phi-4-mini's) becomes "phi_3"."""
    have = set(vocab.tokens)
    if all(t in have for t in PHI3_NAME_TOKENS):
        return name
    return re.sub("phi-?3", "phi_3", name, flags=re.IGNORECASE)


def write_view(view, out, *, dtype: str | None = None, out_dtype: str | None = None, max_shard=None,
               progress=None, prepared: Prepared | None = None) -> Manifest:
    """Write `view` as DST/model.gguf (+ Modelfile) into commit.Output `out`; the uncommitted manifest."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.gguf_writer import WriterState

    from ckptflow.formats import gguf_vocab

    p = prepared or prepare(view, dtype or out_dtype)
    writer = GGUFWriter(None, view.family.GGUF_ARCH)
    for key, typ, value in p.kv + p.vocab.metadata():
        add(writer, key, typ, value)
    for t in p.tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, GGMLQuantizationType[t.qtype])
    handles: dict = {}
    try:
        with out.open(FILE) as f:
            sink = _Sink(f)
            writer.fout, writer.state = [sink], WriterState.EMPTY   # what open_output_file sets up
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in p.tensors:
                writer.write_padding(sink, sink.tell())
                start = sink.tell()
                for data in tensor_chunks(t, handles, view.args):
                    sink.write(data)
                if sink.tell() - start != t.nbytes:
                    raise CkptError(f"GGUF tensor {t.name!r}: produced {sink.tell() - start} bytes, expected {t.nbytes}")
                if progress is not None:
                    progress(t.nbytes)
            writer.write_padding(sink, sink.tell())
    finally:
        for h in handles.values():
            h.close()
    out.put(MODELFILE, gguf_vocab.modelfile(FILE, p.vocab).encode())
    return Manifest(kind="model", format="gguf", family=view.family.NAME, model_args=view.args.to_dict(),
                    dtype=p.dtype, extra={"gguf": {"file": FILE, "arch": view.family.GGUF_ARCH,
                                                   "tensors": len(p.tensors), "tokenizer": p.vocab.model,
                                                   "pre": p.vocab.pre}})


def model_name(view) -> str:
    m = view.manifest
    src = ((m.lineage if m is not None else None) or {}).get("source") or view.uri
    return storage.basename(src.split("?")[0].rstrip("/")) or view.family.NAME
