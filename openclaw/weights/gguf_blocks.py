"""GGUF tensors -> the internal layout (openclaw.kernels.qlinear.QuantWeight), repacked block by block.

Q4_0, Q4_1 and Q4_K go to 4-bit codes, Q5_0, Q6_K and Q8_0 to 8-bit codes; group = the format's (sub-)block:
32, or 16 for Q6_K. Codes are copied exactly; scales and offsets are float16: exact for Q4_0/Q4_1/Q5_0/Q8_0
(d and m are float16 already), one rounding of the sub-block products d * sc and dmin * m for Q4_K and Q6_K.
The symmetric types (w = d * (q - z): Q4_0, Q5_0, Q6_K, Q8_0) keep no offsets, only their zero code z.
It does not read metadata or tokenizers (openclaw.weights.gguf_import does).
"""

from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch

from openclaw.errors import OpenClawError
from openclaw.kernels.qlinear import QuantWeight
from openclaw.weights.gguf_arch import Entry, architecture, config, tensor_plan, unpermute
from openclaw.weights.gguf_import import _open
from openclaw.weights.layout import Layout

Q = gguf.GGMLQuantizationType
# GGUF type -> our layout: bits of the container, group, offsets (asymmetric types), zero code (symmetric ones)
REPACKED = {Q.Q4_0: Layout(4, 32, False, False, 8), Q.Q4_1: Layout(4, 32, True, False),
            Q.Q4_K: Layout(4, 32, True, False), Q.Q5_0: Layout(8, 32, False, False, 16),
            Q.Q6_K: Layout(8, 16, False, False, 32), Q.Q8_0: Layout(8, 32, False, False, 128)}


def _open_supported(path: Path, missing_hint: str = "") -> tuple[object, str]:
    """(reader, architecture) of a GGUF file of an architecture we import; one-line errors otherwise."""
    if not path.is_file():
        raise OpenClawError(f"GGUF file {path} does not exist {missing_hint}".rstrip())
    reader = _open(path)
    return reader, architecture(reader, path)


def _repacks(entry: Entry) -> bool:
    """A 2-D weight (one expert of a 3-D tensor too) of a type we keep in blocks; kv_b_proj joined from two tensors is
    built in float32."""
    return len(entry.shape) == 2 and entry.value is None and entry.tensor.tensor_type in REPACKED


def iter_gguf(path: Path, device: torch.device | str = "cpu") -> Iterator[tuple[str, QuantWeight | torch.Tensor]]:
    """Every tensor of a GGUF file by its HF name (openclaw.weights.gguf_arch: experts one by one, the MTP layer
    skipped), one at a time, on `device`: 2-D weights of the REPACKED types as QuantWeight (llama's Q/K rows
    un-permuted), others (norms, F16/F32, types we do not repack, MLA's kv_b_proj) dequantized by the gguf package
    to float32 tensors."""
    path = Path(path)
    reader, arch = _open_supported(path, "(a moved or deleted source file?); import it again")
    for entry in tensor_plan(reader, arch, path, config(reader, arch, path)):
        t = entry.tensor
        try:
            if _repacks(entry):
                qw = gguf_to_quant(t.name, entry.data(), t.tensor_type, entry.shape, device)
                heads = entry.heads
                yield entry.name, qw if heads is None else _permute_rows(qw, unpermute(np.arange(entry.shape[0]),
                                                                                       heads))
            else:
                yield entry.name, torch.from_numpy(np.require(entry.dequantized(), np.float32, ["C", "W"])).to(device)
        except (ValueError, IndexError) as e:  # numpy reshapes of a tensor whose bytes disagree with its shape
            raise OpenClawError(f"{path}: tensor {t.name} is corrupt ({e}); re-download the file") from e


def gguf_tensor_layouts(path: Path) -> tuple[dict, list[tuple[str, tuple[int, ...], Layout | None]]]:
    """(the HF config, every tensor as (HF name, shape, our Layout or None when it loads in full precision)) of a
    GGUF file, from its header alone: what the memory planner needs to count the bytes iter_gguf will produce."""
    path = Path(path)
    reader, arch = _open_supported(path)
    cfg = config(reader, arch, path)
    plan = tensor_plan(reader, arch, path, cfg)
    return cfg, [(e.name, e.shape, REPACKED[e.tensor.tensor_type] if _repacks(e) else None) for e in plan]


def _permute_rows(qw: QuantWeight, rows: np.ndarray) -> QuantWeight:
    """Reorder whole rows (output features): exact, since every row has its own codes, scales and offsets."""
    idx = torch.from_numpy(rows).to(qw.device)
    return QuantWeight(qw.qweight[idx], qw.scales[idx], None if qw.offsets is None else qw.offsets[idx], qw.lut,
                       qw.bits, qw.group, qw.shape, qw.zero)


def gguf_to_quant(name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, int],
                  device: torch.device | str = "cpu") -> QuantWeight:
    """One GGUF weight's raw blocks (uint8 [N, K / block * block_bytes], as GGUFReader maps them) -> QuantWeight
    [N, K] whose dequantize() equals gguf.quants.dequantize (bit for bit where the scales are exact in float16)."""
    n, k = shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if k % block or tuple(data.shape) != (n, k // block * size) or data.dtype != np.uint8:
        raise OpenClawError(f"GGUF tensor {name} ({qtype.name}, shape {list(shape)}) holds {data.dtype} "
                            f"{list(data.shape)} bytes instead of [{n}, {k // block * size}]; the file is corrupt")
    b = torch.from_numpy(np.array(data)).to(device).view(-1, size)  # one row of blocks per block
    packed, scales, offsets = _UNPACK[qtype](b)
    lay = REPACKED[qtype]
    scales = scales.reshape(n, k // lay.group).contiguous()
    offsets = None if offsets is None else offsets.reshape(n, k // lay.group).contiguous()
    if not (torch.isfinite(scales).all() and (offsets is None or torch.isfinite(offsets).all())):
        raise OpenClawError(f"GGUF tensor {name} has scales beyond float16's range; the file is corrupt")
    return QuantWeight(packed.reshape(n, k * lay.bits // 8), scales, offsets, None, lay.bits, lay.group, (n, k),
                       lay.zero)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 fields: uint8 [..., 2] -> float32 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [..., B] -> codes [..., 2, B]: the low nibbles of the B bytes, then the high ones (ggml's order)."""
    return torch.stack((qs & 0xF, qs >> 4), dim=-2)


def _renibble(qs: torch.Tensor) -> torch.Tensor:
    """ggml's 4-bit order -> ours without unpacking: qs uint8 [..., B] holds 2B codes, element j in the low nibble
    of byte j and element B + j in its high nibble; ours puts elements 2i, 2i + 1 in byte i (low, high)."""
    even, odd = qs[..., 0::2], qs[..., 1::2]
    return torch.cat(((even & 0xF) | (odd << 4), (even >> 4) | (odd & 0xF0)), dim=-1)


# Each unpacker: blocks uint8 [nb, block bytes] -> (our packed bytes, scales, offsets as float16 [nb, groups]; None
# for the symmetric types, whose REPACKED layout has the zero code instead).
def _q4_0(b):
    return _renibble(b[:, 2:]), _f16(b[:, :2])[:, None].half(), None


def _q4_1(b):
    return _renibble(b[:, 4:]), _f16(b[:, :2])[:, None].half(), _f16(b[:, 2:4])[:, None].half()


def _q5_0(b):
    bit = torch.arange(32, device=b.device)
    high = (b[:, 2:6][:, bit // 8] >> (bit % 8).to(torch.uint8)) & 1  # qh: 32 little-endian bits, one per element
    return _nibbles(b[:, 6:]).view(-1, 32) | (high << 4), _f16(b[:, :2])[:, None].half(), None


def _q8_0(b):
    return b[:, 2:] ^ 0x80, _f16(b[:, :2])[:, None].half(), None  # int8 q + 128 as a byte: its sign bit flipped


def _q4_k(b):
    d, dmin = _f16(b[:, :2])[:, None], _f16(b[:, 2:4])[:, None]
    s = b[:, 4:16].reshape(-1, 3, 4)  # 8 six-bit scales and mins packed in 12 bytes (ggml's get_scale_min_k4)
    lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([lo & 0x3F, (hi & 0xF) | ((lo >> 2) & 0x30)], dim=1).float()
    mn = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], dim=1).float()
    packed = _renibble(b[:, 16:].reshape(-1, 4, 32))  # sub-blocks 2i, 2i + 1: low, high nibbles of 32 bytes
    return packed, (d * sc).half(), (-(dmin * mn)).half()


def _q6_k(b):
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])[:, None]
    low = _nibbles(ql.reshape(-1, 2, 64)).reshape(-1, 256)  # halves of 128: low nibbles of 64 bytes, then high
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device)
    high = ((qh.reshape(-1, 2, 1, 32) >> shifts[:, None]) & 3).reshape(-1, 256)
    return low | (high << 4), (d * sc.contiguous().view(torch.int8).float()).half(), None


_UNPACK = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q8_0: _q8_0, Q.Q4_K: _q4_k, Q.Q6_K: _q6_k}
