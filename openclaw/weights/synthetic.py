"""Random weights of a model's real shapes, in the layout a manifest format loads into: for measuring speed and
memory before a download (`openclaw bench --random-weights`); decode speed does not depend on the values.

A synthetic model directory holds only config.json: the manifest entry's config with quantization_config
{"quant_method": "random", "format": <manifest format>}. The loader then streams random tensors by checkpoint name
(random_tensors) through its usual path (fusing, 8-bit embeddings, tiling), and openclaw.weights.sizes plans them
like the real checkpoint's. Codes are uniform and scales make every linear layer's output O(1), so activations stay
finite. It does not write weights to disk or know any model family by name.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from openclaw.kernels.qlinear import QuantWeight
from openclaw.models.family import Family
from openclaw.models.layers import QuantEmbedding, QuantLinear
from openclaw.weights.formats import NF4_CODE
from openclaw.weights.layout import FORMAT_LAYOUTS, Layout, eight_bit

METHOD = "random"


def synthetic_dir(cache_dir: Path, name: str, raw_config: dict, fmt: str) -> Path:
    """A model directory (config.json only) of random weights of raw_config's shapes in manifest format fmt."""
    d = Path(cache_dir) / "random" / name
    d.mkdir(parents=True, exist_ok=True)
    config = {**raw_config, "quantization_config": {"quant_method": METHOD, "format": fmt}}
    (d / "config.json").write_text(json.dumps(config, indent=1))
    return d


def loaded_format(fmt: str, quantize: str) -> str:
    """The manifest format a model of format fmt is held in after loading with --quantize quantize (as
    openclaw.weights.hub.load_quantize resolved it): none dequantizes GGUF blocks and skips NF4-at-load, nf4
    quantizes a full-precision one."""
    if quantize == "none" and (fmt.startswith("gguf") or fmt == "bf16->nf4"):
        return "bf16"
    if quantize == "nf4" and fmt == "bf16":
        return "bf16->nf4"
    return fmt


def layout_of(raw: dict) -> Layout | None:
    """The linear layers' layout of a synthetic config.json (None: full precision, as a bf16 checkpoint)."""
    return FORMAT_LAYOUTS.get(raw["quantization_config"].get("format", ""))


def random_quant(n: int, k: int, layout: Layout, device: torch.device | str) -> QuantWeight:
    """A [n, k] weight in `layout` with uniform codes; scale and offset center it with a standard deviation of about
    1 / sqrt(k)."""
    codes = torch.randint(0, 256, (n, k * layout.bits // 8), dtype=torch.uint8, device=device)
    levels = torch.tensor(NF4_CODE) if layout.lut else torch.arange(1 << layout.bits, dtype=torch.float32)
    lut = levels.to(device) if layout.lut else None
    levels = levels - layout.zero
    mean, std = levels.mean().item(), levels.std().item()
    scale = torch.full((n, k // layout.group), 1 / (std * k ** 0.5), dtype=torch.float16, device=device)
    offsets = (-mean * scale.float()).half() if layout.offsets else None
    return QuantWeight(codes, scale, offsets, lut, layout.bits, layout.group, (n, k), layout.zero)


def random_tensors(family: Family, cfg, layout: Layout | None, device: torch.device | str,
                   dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor | QuantWeight]]:
    """Every checkpoint tensor of a model of config cfg by its checkpoint name, random: the decoder's linear weights
    (cfg.linear_shapes) in layout (or dtype), the other quantized tables (embeddings, lm_head) 8-bit, any other
    matrix in dtype, biases 0, norms 1."""
    g = None if torch.device(device).type == "meta" else torch.Generator(device).manual_seed(0)
    quantized = layout is not None
    seen = set()
    for name, n, k, bias in cfg.linear_shapes():
        if not quantized:
            yield name, torch.randn(n, k, generator=g, device=device, dtype=dtype) / k ** 0.5
        else:  # a row that does not split into the format's groups: the loader makes it 8-bit, so do we
            yield name, random_quant(n, k, layout if k % layout.group == 0 else eight_bit(k), device)
        seen.add(name)
        if bias:
            seen.add(name.removesuffix("weight") + "bias")
            yield name.removesuffix("weight") + "bias", torch.zeros(n, dtype=dtype, device=device)
    with torch.device("meta"):
        model = family.model(cfg, quantized)
    for mname, m in model.named_modules():
        name = f"{mname}.weight"
        if isinstance(m, (QuantLinear, QuantEmbedding)) and name not in seen and not _fused(family, cfg, name):
            seen.add(name)
            if not (cfg.tie_word_embeddings and name == "lm_head.weight"):  # the loader shares the embedding's
                n, k = (m.num_embeddings, m.embedding_dim) if isinstance(m, QuantEmbedding) else (m.out_features,
                                                                                                m.in_features)
                yield name, random_quant(n, k, eight_bit(k), device)
    for name, p in model.named_parameters():
        if name in seen or _fused(family, cfg, name) or family.checkpoint_target(cfg, name) is None:
            continue
        if p.dim() >= 2:  # an unquantized model's embedding / lm_head, any other matrix a family keeps
            yield name, torch.randn(p.shape, generator=g, device=device, dtype=dtype) / p.shape[-1] ** 0.5
        else:  # norms
            yield name, torch.ones(p.shape, dtype=dtype, device=device)


def _fused(family: Family, cfg, name: str) -> bool:
    """Whether a model parameter is a fused projection, whose checkpoint parts linear_shapes names."""
    return bool(family.packed_sizes(cfg, name))
