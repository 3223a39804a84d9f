"""Bounds on what a GGUF header may claim, checked by walking it before gguf.GGUFReader reads it.

GGUFReader builds Python objects for every element of every header array (about 1.1 KB each), so a 31 MB file that
claimed a 2M-entry token list took 3.5 GB of RAM. This walk reads the key-value section and the tensor list through
a small buffer, refusing counts beyond what real models have and lengths beyond the file's end. It keeps no values
(gguf_import reads them, through GGUFReader, once the header has passed).
"""

import struct
from pathlib import Path
from typing import BinaryIO

from openclaw.errors import OpenClawError

MAX_ARRAY = 2**19  # elements of one header array: twice the largest vocabulary in use (Gemma's 262,144 tokens)
MAX_ENTRIES = 2**16  # key-value pairs, and tensors
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4  # arrays of arrays (no real file has any)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> size
_STRING, _ARRAY = 8, 9


def check_header(path: Path) -> None:
    """Raise OpenClawError when the GGUF header at path claims more entries than MAX_* or more bytes than the file
    holds. Files that are not GGUF at all pass: GGUFReader says what they are not."""
    path = Path(path)
    with path.open("rb") as f:
        walk = _Walk(f, path.stat().st_size, path)
        if f.read(4) != b"GGUF":
            return
        version = walk.unpack("I")
        if version & 0xFFFF == 0:  # written big-endian (GGUFReader reads those too)
            walk.order = ">"
        n_tensors, n_kv = walk.unpack("Q"), walk.unpack("Q")
        walk.bound(n_kv, MAX_ENTRIES, "key-value pairs")
        walk.bound(n_tensors, MAX_ENTRIES, "tensors")
        for _ in range(n_kv):
            walk.string()
            walk.value(walk.unpack("I"))
        for _ in range(n_tensors):
            walk.string()
            n_dims = walk.unpack("I")
            walk.bound(n_dims, MAX_DIMS, "dimensions in one tensor")
            f.seek(8 * n_dims + 4 + 8, 1)  # the dimensions, the type, the data offset
            walk.left(0)


class _Walk:
    def __init__(self, f: BinaryIO, size: int, path: Path):
        self.f, self.size, self.path, self.order = f, size, path, "<"

    def left(self, n: int) -> None:
        """Refuse a claim of n more bytes than the file has left."""
        if n > self.size - self.f.tell():
            raise OpenClawError(f"{self.path} is not a readable GGUF file: its header claims {n} bytes past its end; "
                                "it may be truncated, re-download it")

    def bound(self, count: int, limit: int, what: str) -> None:
        if count > limit:
            raise OpenClawError(f"{self.path} is not a readable GGUF file: its header claims {count} {what}, over the "
                                f"{limit} OpenClaw reads; it is damaged or not a model, re-download it")

    def unpack(self, fmt: str) -> int:
        n = struct.calcsize(fmt)
        self.left(n)
        return struct.unpack(self.order + fmt, self.f.read(n))[0]

    def string(self) -> None:
        n = self.unpack("Q")
        self.left(n)
        self.f.seek(n, 1)

    def value(self, kind: int, depth: int = 0) -> None:
        if kind in _SCALAR_BYTES:
            self.left(_SCALAR_BYTES[kind])
            self.f.seek(_SCALAR_BYTES[kind], 1)
        elif kind == _STRING:
            self.string()
        elif kind == _ARRAY:
            self.bound(depth + 1, MAX_NESTING, "levels of nested arrays")
            item, count = self.unpack("I"), self.unpack("Q")
            self.bound(count, MAX_ARRAY, "elements in one array")
            if item in _SCALAR_BYTES:
                self.left(count * _SCALAR_BYTES[item])
                self.f.seek(count * _SCALAR_BYTES[item], 1)
            else:
                self.left(count * 8)  # a string or an array takes 8 bytes at least
                for _ in range(count):
                    self.value(item, depth + 1)
        else:
            raise OpenClawError(f"{self.path} is not a readable GGUF file: its header has a value of unknown type "
                                f"{kind}; it is damaged or from a newer format, re-download it")
