"""safetensors at the byte level: validated headers, tensor bytes by offset, and a streaming writer.

Working on bytes (not torch tensors) lets conversion copy a tensor without materialising the
model, without importing torch, and reproduce the original files byte for byte: the header is
compact JSON with __metadata__ first and tensors in data order, padded with spaces to 8 bytes,
exactly as the safetensors library writes it.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from ckptflow import storage
from ckptflow.errors import CkptError

DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
              "U64": "uint64"}
ST_NAME = {v: k for k, v in TORCH_NAME.items()}
MAX_HEADER = 100 * 1024 * 1024


def code_of(torch_dtype, where: str, key: str) -> str:
    """The safetensors code of a torch dtype; one ckptflow does not handle is an error naming the tensor."""
    code = ST_NAME.get(str(torch_dtype).removeprefix("torch."))
    if code is None:
        raise CkptError(f"{where}: tensor {key!r} has dtype {torch_dtype}, which ckptflow does not handle")
    return code


@dataclass
class TensorInfo:
    name: str
    dtype: str          # safetensors code: "BF16", "F32", ...
    shape: list
    start: int          # absolute byte offset of the data in `file`
    end: int
    file: str           # URI of the shard

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(uri: str, file_size: int | None = None) -> tuple[dict, list[TensorInfo]]:
    """(metadata, tensors in data order), validated against the file size: a truncated file,
    a lying header or overlapping offsets is an error naming the file and the tensor."""
    size = storage.size(uri) if file_size is None else file_size
    if size < 8:
        raise CkptError(f"{uri}: truncated safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", storage.read_bytes(uri, 0, 8))
    if n > MAX_HEADER or 8 + n > size:
        raise CkptError(f"{uri}: safetensors header length {n} does not fit a {size}-byte file")
    try:
        header = json.loads(storage.read_bytes(uri, 8, 8 + n))
    except ValueError as e:
        raise CkptError(f"{uri}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CkptError(f"{uri}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors = [_tensor_info(uri, name, entry, base) for name, entry in header.items()]
    tensors.sort(key=lambda t: (t.start, t.end))
    _check_layout(uri, tensors, base, size)
    return meta, tensors


def _tensor_info(uri: str, name: str, e, base: int) -> TensorInfo:
    try:
        dtype, shape, (a, b) = e["dtype"], list(e["shape"]), e["data_offsets"]
    except (TypeError, KeyError, ValueError) as err:
        raise CkptError(f"{uri}: malformed header entry for tensor {name!r}") from err
    if dtype not in DTYPE_SIZE:
        raise CkptError(f"{uri}: tensor {name!r} has unknown dtype {dtype!r}")
    t = TensorInfo(name, dtype, shape, base + int(a), base + int(b), uri)
    if any((not isinstance(s, int)) or s < 0 for s in shape) or t.numel * DTYPE_SIZE[dtype] != t.nbytes:
        raise CkptError(f"{uri}: tensor {name!r} header says {dtype}{shape} but spans {t.nbytes} bytes")
    return t


def _check_layout(uri: str, tensors: list[TensorInfo], base: int, size: int) -> None:
    pos = base
    for t in tensors:
        if t.start != pos:
            raise CkptError(f"{uri}: tensor {t.name!r} data does not follow the previous tensor (hole or overlap)")
        pos = t.end
    if pos > size:
        last = tensors[-1].name if tensors else "?"
        raise CkptError(f"{uri}: truncated: tensor {last!r} ends at byte {pos} but the file has {size}")
    if pos < size:
        raise CkptError(f"{uri}: {size - pos} trailing bytes after the last tensor")


def header_bytes(entries: list[tuple[str, str, list, int]], metadata: dict | None) -> bytes:
    """The 8-byte length + header for tensors (name, dtype, shape, nbytes) in this data order."""
    header: dict = {}
    if metadata:
        if any(not isinstance(v, str) for v in metadata.values()):
            raise ValueError("safetensors metadata values must be strings")
        header["__metadata__"] = metadata
    pos = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def read_tensor_bytes(t: TensorInfo, f=None) -> bytes:
    """The raw bytes of one tensor; `f` is an already open file of t.file, to avoid re-opening."""
    if f is None:
        return storage.read_bytes(t.file, t.start, t.end)
    f.seek(t.start)
    data = f.read(t.nbytes)
    if len(data) != t.nbytes:
        raise CkptError(f"{t.file}: truncated while reading tensor {t.name!r}")
    return data


def iter_tensor_chunks(t: TensorInfo, f, chunk: int = storage.CHUNK):
    f.seek(t.start)
    left = t.nbytes
    while left:
        data = f.read(min(chunk, left))
        if not data:
            raise CkptError(f"{t.file}: truncated while reading tensor {t.name!r}")
        left -= len(data)
        yield data


def to_torch(data: bytes, dtype: str, shape: list):
    """A torch tensor over raw little-endian bytes (copied, so it owns its memory)."""
    import torch

    tdtype = getattr(torch, TORCH_NAME[dtype])
    if not data:
        return torch.empty(shape, dtype=tdtype)
    return torch.frombuffer(bytearray(data), dtype=tdtype).reshape(shape)


def from_torch(t) -> tuple[str, list, bytes]:
    """(dtype code, shape, raw bytes) of a CPU tensor."""
    import torch

    t = t.detach().to("cpu").contiguous()
    code = ST_NAME[str(t.dtype).removeprefix("torch.")]
    if t.numel() == 0:
        return code, list(t.shape), b""
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return code, list(t.shape), raw
