"""Bytes of a model's weights in the form the loader will hold them: linear layers in their quantized layout (or the
dtype), embeddings and lm_head 8-bit when quantized, norms and biases in the dtype. From config.json, a checkpoint's
tensor headers (our own layout, GGUF) or a manifest entry; nothing is loaded. The plan around it is openclaw.memory's.
"""

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """How one quantized weight is stored (kernels/qlinear.py): bits per code, group, offsets, a 16-entry lut, the
    zero code (QuantWeight.layout's fields). The zero costs no bytes, but parts of different layouts are not fused."""

    bits: int
    group: int
    offsets: bool
    lut: bool
    zero: int = 0

    def nbytes(self, n: int, k: int) -> int:
        groups = n * (k // self.group)
        return n * k * self.bits // 8 + groups * 2 * (1 + self.offsets) + 64 * self.lut


def rtn_group(k: int) -> int:
    """The group of weights the loader quantizes itself (8-bit embeddings / lm_head): 128, or the largest power of
    two from 64 down to 16 that divides K, else K."""
    return next((g for g in (128, 64, 32, 16) if k % g == 0), k)


def eight_bit(k: int) -> Layout:
    """Embeddings, lm_head and anything a quantized checkpoint leaves in full precision."""
    return Layout(8, rtn_group(k), True, False)


NF4 = Layout(4, 64, False, True)  # bitsandbytes' NF4, what --quantize nf4 makes of full-precision linear layers
# manifest formats whose linear layers load quantized, and their layout (others load in the model dtype)
FORMAT_LAYOUTS = {"awq-int4": Layout(4, 128, True, False), "bnb-nf4": NF4, "bf16->nf4": NF4,
                  "gguf-q4_1": Layout(4, 32, True, False)}


def config_layout(raw: dict) -> Layout | None:
    """The layout of a checkpoint's linear layers from config.json's quantization_config (None: unquantized)."""
    qc = raw.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "?")).lower()
    if method == "bitsandbytes":
        return Layout(4, int(qc.get("bnb_4bit_blocksize", 64)), False, qc.get("bnb_4bit_quant_type", "nf4") == "nf4")
    return Layout(int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size", 128))),
                  bool(qc.get("zero_point", True)), False)


def _linear_shapes(cfg: dict) -> list[tuple[int, int, bool]]:
    """(N, K, has bias) of every checkpoint linear weight of the dense family, all layers."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    hkv = cfg.get("num_key_value_heads") or heads
    d = cfg.get("head_dim") or h // heads
    qkv_bias = cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias"))
    o_bias = cfg.get("model_type") != "qwen2" and bool(cfg.get("attention_bias"))
    layer = [(heads * d, h, qkv_bias), (hkv * d, h, qkv_bias), (hkv * d, h, qkv_bias), (h, heads * d, o_bias),
             (inter, h, False), (inter, h, False), (h, inter, False)]
    return layer * cfg["num_hidden_layers"]


def weight_bytes(cfg: dict, dtype_bytes: int, layout: Layout | None) -> int:
    """Bytes the loader allocates for the weights: linear layers in `layout` (or the dtype), embeddings and lm_head
    8-bit when quantized (a tied lm_head shares the embedding), norms and biases in the dtype."""
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or h // heads
    norms = cfg["num_hidden_layers"] * (2 * h + (2 * d if cfg.get("model_type") == "qwen3" else 0)) + h
    total = norms * dtype_bytes
    for n, k, bias in _linear_shapes(cfg):
        # a weight whose rows do not split into the format's groups stays full precision: the loader makes it 8-bit
        fits = layout is not None and k % layout.group == 0
        total += (layout.nbytes(n, k) if fits else eight_bit(k).nbytes(n, k) if layout else n * k * dtype_bytes)
        total += bias * n * dtype_bytes
    tables = 1 if cfg.get("tie_word_embeddings") else 2
    return total + tables * (eight_bit(h).nbytes(vocab, h) if layout else vocab * h * dtype_bytes)


def quantized_weight_bytes(tensors: list[tuple[str, tuple[int, ...], Layout | None]], dtype_bytes: int,
                           tied: bool) -> int:
    """Bytes the loader allocates for a quantized model, from its checkpoint tensors (HF name, shape, Layout; None
    for a full-precision one): parts fused into one module (q/k/v, gate/up) are stacked into one weight when they
    share a layout, else kept apart, each in its own (the loader's rule, openclaw.loader._fuse; one lut for a stack);
    full-precision 2-D weights become 8-bit; 1-D tensors (norms, biases) stay in the dtype."""
    from openclaw.models.qwen3 import checkpoint_target

    total, fused = 0, {}
    for name, shape, layout in tensors:
        target = checkpoint_target(name)
        if target is None or (tied and name == "lm_head.weight"):
            continue  # the loader skips these too
        if len(shape) != 2:
            total += dtype_bytes * _numel(shape)
            continue
        layout = layout or eight_bit(shape[1])
        target, index, _ = target
        if index < 0:
            total += layout.nbytes(*shape)
        else:
            fused.setdefault(target, []).append((shape, layout))
    for parts in fused.values():
        if len({lay for _, lay in parts}) == 1:
            total += parts[0][1].nbytes(sum(shape[0] for shape, _ in parts), parts[0][0][1])
        else:
            total += sum(lay.nbytes(*shape) for shape, lay in parts)
    return total


def checkpoint_weight_bytes(model_dir: Path, dtype_bytes: int, nf4: bool = False) -> int:
    """weight_bytes for a local checkpoint (nf4: its full-precision linear layers quantized to NF4 at load); exact per
    tensor for our own layout (quant_method "openclaw"), whose safetensors headers record each weight's bits and
    group, and for a GGUF file kept quantized (quant_method "gguf"), from its tensor types."""
    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    method = str((raw.get("quantization_config") or {}).get("quant_method"))
    if method == "gguf":
        from openclaw.quant_gguf import gguf_tensor_layouts

        _, tensors = gguf_tensor_layouts(model_dir / raw["quantization_config"].get("gguf_file", "model.gguf"))
        return quantized_weight_bytes(tensors, dtype_bytes, bool(raw.get("tie_word_embeddings")))
    if method == "None":
        return weight_bytes(raw, dtype_bytes, NF4 if nf4 else None)
    if method != "openclaw":
        from openclaw.quant_formats import detect_format

        detect_format(model_dir, raw)  # refuses an unknown or unsupported quantization_config, naming it
        return weight_bytes(raw, dtype_bytes, config_layout(raw))
    from safetensors import safe_open

    from openclaw.loader import shard_files

    total, tied = 0, bool(raw.get("tie_word_embeddings"))
    for path in shard_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            layouts = json.loads((f.metadata() or {}).get("openclaw.quant", "{}"))
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                base, _, part = name.rpartition(".")
                if f"{base}#parts" in layouts:
                    if part == "qweight":
                        bits, group, n, k, *_ = layouts[base]  # then the zero code, which costs nothing
                        parts = layouts[f"{base}#parts"]
                        total += Layout(bits, group, "offsets" in parts, "lut" in parts).nbytes(n, k)
                    continue
                if tied and name == "lm_head.weight":
                    continue
                shape = f.get_slice(name).get_shape()
                if name.endswith(("embed_tokens.weight", "lm_head.weight", "proj.weight")):
                    total += eight_bit(shape[1]).nbytes(*shape)
                else:
                    total += dtype_bytes * _numel(shape)
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
