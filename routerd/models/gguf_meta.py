"""Fast GGUF header reading: the metadata routerd needs, without loading a vocabulary.

``gguf.GGUFReader`` parses every field eagerly (seconds and hundreds of MiB for a 151k-token
vocabulary); this reader walks the key/value section, skipping the contents of large arrays,
then reads the tensor table for per-layer weight sizes. Results are cached by (path, size,
mtime). It reads files and knows nothing about backends or devices.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO

import attrs

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
#: Arrays up to this length are read (per-layer head counts); longer ones (vocabularies) skipped.
_SMALL_ARRAY = 1024
#: A shard of a split model: ``NAME-00001-of-00003.gguf``.
SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")

# llama.cpp file types (general.file_type) by number, for display.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
              17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
              23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
              29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4"}


class GGUFError(ValueError):
    pass


@attrs.frozen
class GGUFMeta:
    path: str
    file_size: int
    architecture: str
    name: str = ""
    size_label: str = ""
    quantization: str = ""
    block_count: int = 0
    context_length: int = 0
    embedding_length: int = 0
    head_count: int = 0
    #: Per-layer KV head counts (one entry per layer).
    head_count_kv: tuple[int, ...] = ()
    key_length: int = 0
    value_length: int = 0
    sliding_window: int = 0
    vocab_size: int = 0
    #: Bytes of tensor data per layer index, and outside layers (embeddings, output).
    layer_bytes: tuple[int, ...] = ()
    other_bytes: int = 0
    parameter_count: int = 0
    #: general.type, e.g. "model", "mmproj", "imatrix" (empty when not set).
    kind: str = ""

    @property
    def weights_bytes(self) -> int:
        return sum(self.layer_bytes) + self.other_bytes

    def public(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "size_label": self.size_label,
                "parameters": self.parameter_count or None, "quantization": self.quantization,
                "context_length": self.context_length, "file_size": self.file_size}


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise GGUFError("truncated header")
    return struct.unpack(fmt, data)[0]


def _read_string(f: BinaryIO) -> str:
    length = _read(f, "<Q")
    if length > 1 << 24:
        raise GGUFError("implausible string length")
    return f.read(length).decode("utf-8", "replace")


def _read_value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _read_string(f)
    if vtype == _ARRAY:
        item_type, count = _read(f, "<I"), _read(f, "<Q")
        if count <= _SMALL_ARRAY:
            return [_read_value(f, item_type) for _ in range(count)]
        if item_type in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[item_type]), os.SEEK_CUR)
        elif item_type == _STRING:
            for _ in range(count):
                f.seek(_read(f, "<Q"), os.SEEK_CUR)
        else:
            raise GGUFError(f"unsupported nested array type {item_type}")
        return _SkippedArray(count)
    raise GGUFError(f"unknown value type {vtype}")


@attrs.frozen
class _SkippedArray:
    count: int


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[tuple[str, int, int]], int]:
    """(metadata, tensors as (name, element count, offset), data start) of one GGUF file."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file")
        version = _read(f, "<I")
        if version < 2:
            raise GGUFError(f"{path}: GGUF version {version} is not supported")
        tensor_count, kv_count = _read(f, "<Q"), _read(f, "<Q")
        meta: dict[str, Any] = {}
        for _ in range(kv_count):
            key = _read_string(f)
            meta[key] = _read_value(f, _read(f, "<I"))
        tensors = []
        for _ in range(tensor_count):
            name = _read_string(f)
            n_dims = _read(f, "<I")
            elements = 1
            for _ in range(n_dims):
                elements *= _read(f, "<Q")
            _read(f, "<I")  # ggml type
            tensors.append((name, elements, _read(f, "<Q")))
        alignment = int(meta.get("general.alignment", 32))
        data_start = -(-f.tell() // alignment) * alignment
    return meta, tensors, data_start


def split_parts(path: str) -> list[str]:
    """All shards of a split model given any of them (just ``[path]`` when not split)."""
    match = SPLIT_RE.search(path)
    if not match:
        return [path]
    total = int(match.group(2))
    stem = path[: match.start()]
    return [f"{stem}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]


@functools.lru_cache(maxsize=4096)
def _read_cached(path: str, size: int, mtime_ns: int) -> GGUFMeta:
    parts = split_parts(path)
    meta: dict[str, Any] = {}
    layer_bytes: dict[int, int] = {}
    other = 0
    parameters = 0
    total_size = 0
    for part in parts:
        part_meta, tensors, data_start = read_header(part)
        meta = meta or part_meta  # the first shard carries the model's metadata
        part_size = os.path.getsize(part)
        total_size += part_size
        tensors.sort(key=lambda t: t[2])
        ends = [offset for _, _, offset in tensors[1:]] + [part_size - data_start]
        for (name, elements, offset), end in zip(tensors, ends, strict=True):
            nbytes = max(0, end - offset)
            parameters += elements
            layer = _LAYER_RE.match(name)
            if layer:
                index = int(layer.group(1))
                layer_bytes[index] = layer_bytes.get(index, 0) + nbytes
            else:
                other += nbytes
    arch = str(meta.get("general.architecture", ""))
    blocks = int(meta.get(f"{arch}.block_count", 0) or 0)

    def number(key: str, default: int = 0) -> int:
        value = meta.get(key, default)
        return int(value) if isinstance(value, (int, float)) else default

    heads = number(f"{arch}.attention.head_count")
    kv = meta.get(f"{arch}.attention.head_count_kv", heads)
    kv_per_layer = tuple(int(v) for v in kv) if isinstance(kv, list) else (int(kv),) * blocks
    embd = number(f"{arch}.embedding_length")
    head_dim = embd // heads if heads else 0
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = tokens.count if isinstance(tokens, _SkippedArray) else len(tokens) if isinstance(tokens, list) else 0
    file_type = meta.get("general.file_type")
    return GGUFMeta(
        path=path, file_size=total_size, architecture=arch, name=str(meta.get("general.name", "")),
        size_label=str(meta.get("general.size_label", "")),
        quantization=_quantization(file_type),
        block_count=blocks, context_length=number(f"{arch}.context_length"), embedding_length=embd,
        head_count=heads, head_count_kv=kv_per_layer,
        key_length=number(f"{arch}.attention.key_length", head_dim),
        value_length=number(f"{arch}.attention.value_length", head_dim),
        sliding_window=number(f"{arch}.attention.sliding_window"), vocab_size=vocab,
        layer_bytes=tuple(layer_bytes.get(i, 0) for i in range(max(blocks, len(layer_bytes)))),
        other_bytes=other, parameter_count=parameters, kind=str(meta.get("general.type", "")),
    )


def read_meta(path: str | os.PathLike[str]) -> GGUFMeta:
    """The metadata of a model file (all shards of a split model), cached by path, size, mtime."""
    resolved = str(Path(path))
    stat = os.stat(resolved)
    return _read_cached(resolved, stat.st_size, stat.st_mtime_ns)


def _quantization(file_type: object) -> str:
    """``general.file_type`` as llama.cpp names it (an unknown number as itself)."""
    if isinstance(file_type, int) and file_type in FILE_TYPES:
        return FILE_TYPES[file_type]
    return str(file_type) if file_type is not None else ""
