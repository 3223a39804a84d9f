"""Quantized checkpoint formats -> the internal layout (openclaw.kernels.qlinear.QuantWeight), one tensor at a time.

Reads AWQ int4 (GEMM packing) and pre-quantized bitsandbytes 4-bit (nf4/fp4, double-quantized or not) safetensors,
and quantizes unquantized fp16/bf16/fp32 checkpoints to NF4 at load; GGUF blocks are openclaw.weights.gguf_blocks's.
It does not build models or fuse q/k/v and gate/up (openclaw.weights.loader does), and it never holds more than one
checkpoint weight (with its scales) besides what it has yielded.
"""

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from openclaw.errors import OpenClawError
from openclaw.kernels.qlinear import QuantWeight
from openclaw.weights.checkpoint import awq_group, detect_format, shard_files
from openclaw.weights.gguf_blocks import iter_gguf

# bitsandbytes' NF4 code (bitsandbytes.functional.get_4bit_type("nf4")): quantiles of N(0, 1) scaled to [-1, 1]
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
            1.0)
NF4_BLOCKSIZE = 64  # bitsandbytes' default for 4-bit weights (transformers' BitsAndBytesConfig)
# AWQ's GEMM packing stores output column 8j + AWQ_ORDER[i] of each group of eight in nibble i (bits 4i..4i+3)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_SHIFTS = tuple(4 * AWQ_ORDER.index(c) for c in range(8))  # column c of a group sits at this bit offset
_BNB_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_CHUNK_ROWS = 4096  # rows converted at a time, so fp32/int32 temporaries stay a fraction of one weight


def iter_quantized(model_dir: Path, raw: dict, device: torch.device | str = "cpu", nf4: bool = False,
                   dense: tuple[str, ...] = ()) -> Iterator[tuple[str, QuantWeight | torch.Tensor]]:
    """Every tensor of the checkpoint in `model_dir` (config `raw`) by its checkpoint (HF) name, on `device`, one at
    a time: linear weights the format quantizes as QuantWeight [out, in], everything else (norms, biases,
    embeddings, lm_head, modules the format left unquantized) as the plain tensor in its stored dtype.

    What openclaw.weights.loader.checkpoint_tensors reads quantized checkpoints through. Names are unfused (q_proj, k_proj, ...): the loader
    stacks parts of one layout with concat_rows. AWQ and bitsandbytes parts of one layer always share it; GGUF parts
    may not (Q4_K_M keeps some attn_v / ffn_down in Q6_K), and those stay separate weights of one QuantLinear.
    `nf4=True` quantizes an unquantized checkpoint's decoder-layer linear weights to NF4 (bitsandbytes' layout,
    group 64) as they stream by, except those whose names end with one of `dense` (the model holds them in full
    precision: Family.dense): on CUDA with bitsandbytes when it is installed, else in plain torch, same codes.
    A weight bitsandbytes stored in blocks that straddle rows (in_features not a multiple of its blocksize) comes
    back dequantized, as a plain tensor. Conversion runs on `device` (the GPU when there is one: much faster)."""
    fmt = detect_format(model_dir, raw)
    if fmt == "gguf":
        yield from iter_gguf(Path(model_dir) / raw["quantization_config"].get("gguf_file", "model.gguf"), device)
        return
    if fmt == "openclaw":
        raise OpenClawError(f"{model_dir} is in OpenClaw's own layout, which openclaw.weights.loader reads itself")
    with _Shards(Path(model_dir)) as shards:
        if fmt == "awq":
            yield from _iter_awq(shards, raw["quantization_config"], torch.device(device))
        elif fmt == "bitsandbytes":
            yield from _iter_bnb(shards, torch.device(device))
        else:
            for name in shards.names:
                tensor = shards.get(name, device)
                quantize = nf4 and _nf4_target(name, tensor) and not name.endswith(dense)
                yield name, quantize_nf4(tensor, name) if quantize else tensor


class _Shards:
    """Tensor name -> shard of a safetensors checkpoint; files stay mapped while open, tensors are read on demand
    (a weight's scales may sit in the next shard)."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.where: dict[str, Path] = {}
        self._files: dict[Path, object] = {}
        self._stack = ExitStack()

    def __enter__(self):
        for path in shard_files(self.model_dir):
            try:
                f = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except (SafetensorError, OSError) as e:
                self._stack.close()
                raise OpenClawError(f"{path} is unreadable or truncated ({e}); delete it and download it again")
            self._files[path] = f
            self.where.update(dict.fromkeys(f.keys(), path))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @property
    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str, device: torch.device | str = "cpu", owner: str | None = None) -> torch.Tensor:
        if name not in self.where:
            raise OpenClawError(f"{self.model_dir.name}: tensor {name} is missing (needed for {owner or name}); "
                                "the checkpoint is incomplete or not in the format its config.json claims")
        try:
            return self._files[self.where[name]].get_tensor(name).to(device)
        except (SafetensorError, OSError) as e:
            raise OpenClawError(f"{self.where[name]} is truncated or corrupt at tensor {name} ({e}); download it again")


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise OpenClawError(f"tensor {name}: {what}; the checkpoint is corrupt or not in the format config.json names")


def _scales_f16(s: torch.Tensor, name: str) -> torch.Tensor:
    s16 = s.to(torch.float16)
    _check(bool(torch.isfinite(s16).all()), name, "a scale is not finite in float16")
    return s16.contiguous()


def _iter_awq(shards: _Shards, qc: dict, device: torch.device) -> Iterator[tuple[str, QuantWeight | torch.Tensor]]:
    """AutoAWQ's WQLinear_GEMM tensors: qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales fp16 [K/G, N]."""
    group = awq_group(shards.model_dir, qc)
    bases = {n[: -len(".qweight")] for n in shards.names if n.endswith(".qweight")}
    for name in shards.names:
        base, _, part = name.rpartition(".")
        if base not in bases:
            yield name, shards.get(name, device)
        elif part == "qweight":
            qweight, qzeros, scales = (shards.get(f"{base}.{p}", device, name) for p in ("qweight", "qzeros", "scales"))
            yield f"{base}.weight", awq_to_quant(name, qweight, qzeros, scales, group)
        elif part not in ("qzeros", "scales"):
            yield name, shards.get(name, device)  # the layer's bias


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] in AWQ's GEMM order -> uint8 codes [R, 8C] in column order."""
    shifts = torch.tensor(_AWQ_SHIFTS, dtype=torch.int32, device=packed.device)
    return ((packed[:, :, None] >> shifts) & 0xF).to(torch.uint8).view(packed.shape[0], -1)


def awq_to_quant(name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group: int) -> QuantWeight:
    """One AWQ GEMM linear -> QuantWeight [N, K]: codes q, scales s, offsets fp16(-z * s), so that
    w = q * s + offset equals AWQ's (q - z) * s up to that one rounding of z * s to float16."""
    _check(qweight.dtype == torch.int32 and qweight.dim() == 2, name, f"expected int32 [K, N/8], got {qweight.dtype} "
           f"{tuple(qweight.shape)}")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    _check(k % group == 0, name, f"in_features {k} is not a multiple of quantization_config.group_size {group}")
    _check(tuple(scales.shape) == (k // group, n), name, f"scales {tuple(scales.shape)} should be {(k // group, n)}")
    _check(tuple(qzeros.shape) == (k // group, n // 8) and qzeros.dtype == torch.int32, name,
           f"qzeros {qzeros.dtype} {tuple(qzeros.shape)} should be int32 {(k // group, n // 8)}")
    _check(k % 2 == 0, name, f"in_features {k} is odd")
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=qweight.device)
    for start in range(0, k, _CHUNK_ROWS):  # codes [rows of K, N] -> two per byte along K, transposed to [N, K/2]
        codes = _unpack_awq(qweight[start:start + _CHUNK_ROWS])
        packed[:, start // 2:(start + codes.shape[0]) // 2] = (codes[0::2] | (codes[1::2] << 4)).T
    s = _scales_f16(scales.T, name)
    offsets = _scales_f16(-_unpack_awq(qzeros).T.float() * s.float(), name)
    return QuantWeight(packed, s, offsets, None, 4, group, (n, k))


def _iter_bnb(shards: _Shards, device: torch.device) -> Iterator[tuple[str, QuantWeight | torch.Tensor]]:
    """Params4bit as transformers saves it: NAME (packed uint8) beside NAME.absmax, .quant_map, [.nested_absmax,
    .nested_quant_map] and NAME.quant_state.bitsandbytes__{nf4,fp4}."""
    states = {n.rpartition(".quant_state.")[0]: n for n in shards.names if ".quant_state.bitsandbytes__" in n}
    aux = {f"{w}.{p}" for w in states for p in _BNB_PARTS} | set(states.values())
    for name in shards.names:
        if name in aux:
            continue
        if name not in states:
            yield name, shards.get(name, device)
            continue
        state = bnb_state(name, shards.get(states[name]))
        parts = {p: shards.get(f"{name}.{p}", device, name) for p in _BNB_PARTS
                 if p in ("absmax", "quant_map") or "nested_blocksize" in state}
        yield name, bnb_to_quant(name, shards.get(name, device), state, parts)


def bnb_state(name: str, packed_json: torch.Tensor) -> dict:
    """The quant_state.bitsandbytes__{nf4,fp4} tensor: UTF-8 JSON bytes (quant_type, blocksize, dtype, shape, and
    nested_blocksize / nested_offset when the absmax are double-quantized)."""
    try:
        state = json.loads(bytes(packed_json.cpu().to(torch.uint8).tolist()).decode("utf-8"))
        shape = [int(d) for d in state["shape"]]
        int(state["blocksize"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise OpenClawError(f"tensor {name}: its bitsandbytes quant_state is unreadable ({e}); download it again")
    _check(len(shape) == 2 and state.get("quant_type") in ("nf4", "fp4"), name,
           f"quant_state says {state.get('quant_type')!r} {shape}; expected a 2-D nf4 or fp4 weight")
    return state


def bnb_to_quant(name: str, packed: torch.Tensor, state: dict,
                 parts: dict[str, torch.Tensor]) -> QuantWeight | torch.Tensor:
    """One bitsandbytes 4-bit weight -> QuantWeight [N, K] (lut = its quant_map, scales = absmax in fp16, group =
    blocksize), or the weight dequantized as bitsandbytes does when its blocks straddle rows.

    bitsandbytes flattens W row-major, packs element 2i in the HIGH nibble of byte i, and keeps one fp32 absmax
    per block; double quantization stores absmax as uint8 codes: absmax = nested_quant_map[c] *
    nested_absmax[block // nested_blocksize] + nested_offset (fp32). Our only rounding: absmax to float16."""
    n, k = state["shape"]
    block = int(state["blocksize"])
    flat = packed.contiguous().view(torch.uint8).reshape(-1)  # quant_storage may be another dtype
    _check(flat.numel() == (n * k + 1) // 2, name, f"{flat.numel()} packed bytes for a [{n}, {k}] weight")
    absmax = parts["absmax"].reshape(-1)
    _check(absmax.numel() == -(-n * k // block), name, f"{absmax.numel()} absmax for {n * k} weights in blocks of "
           f"{block}")
    lut = parts["quant_map"].float().reshape(-1)
    _check(lut.numel() == 16, name, f"quant_map has {lut.numel()} entries, not 16")
    if "nested_blocksize" in state:
        code, outer = parts["nested_quant_map"].float().reshape(-1), parts["nested_absmax"].float().reshape(-1)
        nb = int(state["nested_blocksize"])
        _check(absmax.dtype == torch.uint8 and code.numel() == 256 and outer.numel() == -(-absmax.numel() // nb),
               name, "double-quantized absmax, nested_quant_map and nested_absmax disagree in size")
        i = torch.arange(absmax.numel(), device=absmax.device)
        absmax = code[absmax.long()] * outer[i // nb] + float(state["nested_offset"])
    absmax = absmax.float()
    if k % block:
        codes = torch.stack((flat >> 4, flat & 0xF), dim=-1).reshape(-1)[:n * k].long()
        idx = torch.arange(n * k, device=flat.device) // block
        return (lut[codes] * absmax[idx]).view(n, k)
    qweight = ((flat << 4) | (flat >> 4)).view(n, k // 2)  # swap nibbles: even k into the low one
    return QuantWeight(qweight, _scales_f16(absmax.view(n, k // block), name), None, lut.contiguous(), 4, block,
                       (n, k))


def _nf4_target(name: str, tensor: torch.Tensor) -> bool:
    """Decoder-layer linear weights whose rows split into whole NF4 blocks; the loader keeps embeddings, lm_head
    and the rest in 8 bits or full precision."""
    return (".layers." in name and name.endswith(".weight") and tensor.dim() == 2
            and tensor.shape[1] % NF4_BLOCKSIZE == 0 and tensor.is_floating_point())


def quantize_nf4(w: torch.Tensor, name: str = "weight") -> QuantWeight:
    """w [N, K] (K a multiple of 64) -> NF4 with bitsandbytes' codes, on w's device: bitsandbytes'
    quantize_4bit when it is installed and w is on CUDA, else nf4_codes (identical codes)."""
    n, k = w.shape
    if w.is_cuda:
        try:
            import bitsandbytes.functional as bnbf
        except ImportError:
            bnbf = None
        if bnbf is not None:
            packed, st = bnbf.quantize_4bit(w.contiguous(), blocksize=NF4_BLOCKSIZE, quant_type="nf4")
            state = {"shape": [n, k], "blocksize": NF4_BLOCKSIZE, "quant_type": "nf4"}
            return bnb_to_quant(name, packed, state, {"absmax": st.absmax, "quant_map": st.code})
    qweight = torch.empty(n, k // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, k // NF4_BLOCKSIZE, dtype=torch.float16, device=w.device)
    for start in range(0, n, _CHUNK_ROWS):
        codes, absmax = nf4_codes(w[start:start + _CHUNK_ROWS])
        qweight[start:start + _CHUNK_ROWS] = codes[:, 0::2] | (codes[:, 1::2] << 4)
        scales[start:start + _CHUNK_ROWS] = _scales_f16(absmax, name)
    lut = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
    return QuantWeight(qweight, scales, None, lut, 4, NF4_BLOCKSIZE, (n, k))


def nf4_codes(w: torch.Tensor, block: int = NF4_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' NF4 rule in plain torch: w [R, K] -> (codes uint8 [R, K], absmax fp32 [R, K // block]).
    x = w * (1 / absmax) in fp32 goes to the nearest code; a value exactly on a midpoint takes the lower code, as
    bitsandbytes' decision tree (x > midpoint) does."""
    r, k = w.shape
    wb = w.float().view(r, k // block, block)
    absmax = wb.abs().amax(-1)
    x = (wb * (1.0 / absmax.clamp_min(1e-38))[..., None]).clamp_(-1, 1)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
    codes = torch.bucketize(x, (code[1:] + code[:-1]) / 2)
    return codes.to(torch.uint8).view(r, k), absmax
