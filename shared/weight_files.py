"""Reading .safetensors files without holding them in memory: the raw header, and tensors streamed
one at a time into the type they are stored in for training.

safetensors' own reader maps the file: every page a tensor was read from stays resident (and counts
in the process's peak RSS) until the file is closed, so converting an fp32 checkpoint to bf16 held
the whole file *and* its bf16 copy. Here each tensor is read with a plain read into one scratch
buffer and converted out of it: the peak is the converted model plus the largest raw tensor.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header

# safetensors' dtype names -> torch dtype attribute names
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2"}


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(the JSON header, the offset the tensor data starts at) of a .safetensors file; ValueError or
    OSError when it is not one (each caller names the file in its own error)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= size <= MAX_HEADER:
            raise ValueError("no safetensors header")
        header = json.loads(fh.read(size).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("its safetensors header is not a mapping")
    return header, 8 + size


def stream_safetensors(path: Path, cast: Callable[[str, Any], Any] | None = None) -> dict:
    """{name: tensor} of a .safetensors file, each passed through `cast(name, tensor)` as it is read
    (see the module docstring). ValueError or OSError for a file that is not a readable one."""
    import torch

    header, start = safetensors_header(path)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
    out = {}
    # with a cast, every tensor is read into one scratch buffer that the cast copies out of: the
    # process never holds more than the converted tensors and the largest raw one
    largest = max((info["data_offsets"][1] - info["data_offsets"][0] for _, info in entries), default=0)
    scratch = torch.empty(largest, dtype=torch.uint8) if cast else None
    with open(path, "rb", buffering=0) as fh:
        for name, info in entries:
            begin, end = info["data_offsets"]
            dtype = getattr(torch, DTYPES[info["dtype"]])
            shape = tuple(info["shape"])
            if end == begin:
                out[name] = torch.empty(shape, dtype=dtype)
                continue
            # memory torch allocated (aligned as its kernels expect), then viewed as the dtype
            buffer = scratch[: end - begin] if cast else torch.empty(end - begin, dtype=torch.uint8)
            fh.seek(start + begin)
            if fh.readinto(buffer.numpy()) != end - begin:
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            tensor = buffer.view(dtype).reshape(shape)
            if cast:
                tensor = cast(name, tensor)
                if tensor.untyped_storage().data_ptr() == scratch.untyped_storage().data_ptr():
                    tensor = tensor.clone()  # the cast kept it as it was: it may not stay in the scratch
            out[name] = tensor
    return out
