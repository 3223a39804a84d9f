"""Bytes of a model's weights in the form the loader will hold them: linear layers in their quantized layout (or the
dtype), embeddings and lm_head 8-bit when quantized, norms and biases in the dtype. From a family's config dataclass
(config.json or a manifest entry) or a checkpoint's tensor headers (our own layout, GGUF); nothing is loaded. The plan
around it is openclaw.engine.memory's.
"""

import json
from pathlib import Path

from safetensors import safe_open

from openclaw.models.family import Family
from openclaw.weights import gguf_blocks
from openclaw.weights.checkpoint import detect_format, model_family, read_config, shard_files
from openclaw.weights.layout import FORMAT_LAYOUTS, NF4, Layout, config_layout, eight_bit


def weight_bytes(cfg, dtype_bytes: int, layout: Layout | None) -> int:
    """Bytes the loader allocates for the weights of a model of config `cfg` (a family config dataclass): linear
    layers in `layout` (or the dtype), embeddings and lm_head 8-bit when quantized (a tied lm_head shares the
    embedding), norms and biases in the dtype."""
    h, vocab = cfg.hidden_size, cfg.vocab_size
    total = cfg.norm_elements() * dtype_bytes + cfg.dense_bytes(dtype_bytes)
    for _, n, k, bias in cfg.linear_shapes():
        # a weight whose rows do not split into the format's groups stays full precision: the loader makes it 8-bit
        fits = layout is not None and k % layout.group == 0
        total += (layout.nbytes(n, k) if fits else eight_bit(k).nbytes(n, k) if layout else n * k * dtype_bytes)
        total += bias * n * dtype_bytes
    tables = 1 if cfg.tie_word_embeddings else 2
    return total + tables * (eight_bit(h).nbytes(vocab, h) if layout else vocab * h * dtype_bytes)


def quantized_weight_bytes(tensors: list[tuple[str, tuple[int, ...], Layout | None]], dtype_bytes: int,
                           tied: bool, family: Family, cfg: object = None) -> int:
    """Bytes the loader allocates for a quantized model, from its checkpoint tensors (HF name, shape, Layout; None
    for a full-precision one): parts fused into one module (q/k/v, gate/up) are stacked into one weight when they
    share a layout, else kept apart, each in its own (the loader's rule, openclaw.weights.loader._fuse; one lut for a
    stack); full-precision 2-D weights become 8-bit; 1-D tensors (norms, biases) and the weights the family holds
    dense stay in the dtype (Family.dense; Family.fp32 in float32)."""
    total, fused = 0, {}
    for name, shape, layout in tensors:
        target = family.checkpoint_target(cfg, name)
        if target is None or (tied and name == "lm_head.weight"):
            continue  # the loader skips these too
        if name.endswith(family.fp32):
            total += 4 * _numel(shape)
            continue
        if len(shape) != 2 or name.endswith(family.dense):
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


def gguf_weight_bytes(path: Path, dtype_bytes: int) -> tuple[dict, int]:
    """(the HF config, weight bytes) of a GGUF file kept in its own blocks, from its header."""
    raw, tensors = gguf_blocks.gguf_tensor_layouts(path)
    family = model_family(raw, path)
    return raw, quantized_weight_bytes(tensors, dtype_bytes, raw["tie_word_embeddings"], family,
                                       family.config.from_dict(raw))


def checkpoint_weight_bytes(model_dir: Path, dtype_bytes: int, nf4: bool = False) -> int:
    """weight_bytes for a local checkpoint (nf4: its full-precision linear layers quantized to NF4 at load); exact per
    tensor for our own layout (quant_method "openclaw"), whose safetensors headers record each weight's bits and
    group, and for a GGUF file kept quantized (quant_method "gguf"), from its tensor types."""
    model_dir = Path(model_dir)
    family, cfg, raw = read_config(model_dir)
    fmt = detect_format(model_dir, raw)  # refuses an unknown or unsupported quantization_config, naming it
    if fmt == "gguf":
        return gguf_weight_bytes(model_dir / raw["quantization_config"].get("gguf_file", "model.gguf"), dtype_bytes)[1]
    if fmt == "unquantized":
        return weight_bytes(cfg, dtype_bytes, NF4 if nf4 else None)
    if fmt == "random":
        return weight_bytes(cfg, dtype_bytes, FORMAT_LAYOUTS.get(raw["quantization_config"].get("format", "")))
    if fmt != "openclaw":
        return weight_bytes(cfg, dtype_bytes, config_layout(raw))
    total, tied = 0, cfg.tie_word_embeddings
    for path in shard_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            layouts = json.loads((f.metadata() or {}).get("openclaw.quant", "{}"))
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                base, _, part = name.rpartition(".")
                if f"{base}#parts" in layouts and base.endswith(family.dense):  # dequantized at load
                    if part == "qweight":
                        total += dtype_bytes * layouts[base][2] * layouts[base][3]
                    continue
                if f"{base}#parts" in layouts:
                    if part == "qweight":
                        bits, group, n, k, *_ = layouts[base]  # then the zero code, which costs nothing
                        parts = layouts[f"{base}#parts"]
                        total += Layout(bits, group, "offsets" in parts, "lut" in parts).nbytes(n, k)
                    continue
                if tied and name == "lm_head.weight" or family.checkpoint_target(cfg, name) is None:
                    continue
                shape = f.get_slice(name).get_shape()
                if name.endswith(family.fp32):
                    total += 4 * _numel(shape)
                elif name.endswith(family.dense):
                    total += dtype_bytes * _numel(shape)
                elif name.endswith(("embed_tokens.weight", "lm_head.weight", "proj.weight", "mqa.weight")):
                    total += eight_bit(shape[1]).nbytes(*shape)
                else:
                    total += dtype_bytes * _numel(shape)
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
