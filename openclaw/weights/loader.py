"""Loads a Hugging Face model directory (config.json + safetensors shards) into our model definitions.

The model is built on the meta device and materialized once at its final dtype/device; checkpoint tensors
are then read one at a time and copied in, so memory never holds two copies of the weights. Quantized
checkpoints become QuantLinear layers: our own layout is read here (save_quantized writes it), other formats
(AWQ, bitsandbytes, GGUF) arrive converted from openclaw.weights.formats.iter_quantized.
It does not find or download models (openclaw.weights.hub), convert GGUF files (openclaw.weights.gguf_import) or
decide whether the weights fit (the engine asks openclaw.engine.memory first and passes what it decided).
"""

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from openclaw.errors import OpenClawError
from openclaw.kernels.qlinear import QuantWeight, concat_rows, interleave_gate_up, quantize_rtn, tile, tiles
from openclaw.models.layers import QuantEmbedding, QuantLinear
from openclaw.weights import synthetic
from openclaw.weights.checkpoint import iter_safetensors, parse_config, quant_method, read_config
from openclaw.weights.formats import iter_quantized
from openclaw.weights.layout import rtn_group

_QPARTS = ("qweight", "scales", "offsets", "lut")


def _internal_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor | QuantWeight]]:
    """Our own quantized layout on disk (quant_method "openclaw", written by save_quantized): each quantized weight
    is NAME.qweight / .scales / [.offsets] / [.lut] in one file, whose metadata "openclaw.quant" holds
    {NAME: [bits, group, N, K, zero]} (files written before the zero code existed list 4 numbers: zero 0)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for path, name, tensor, meta in iter_safetensors(model_dir):
        layouts = json.loads(meta.get("openclaw.quant", "{}"))
        base, _, part = name.rpartition(".")
        if f"{base}#parts" not in layouts:
            yield name, tensor
            continue
        parts.setdefault(base, {})[part] = tensor
        have = parts[base]
        if set(have) >= set(layouts[f"{base}#parts"]):
            del parts[base]
            bits, group, n, k, *zero = layouts[base]
            try:
                yield base, QuantWeight(have["qweight"], have["scales"], have.get("offsets"), have.get("lut"), bits,
                                        group, (n, k), *zero)
            except AssertionError as e:
                raise OpenClawError(f"{path.name}: quantized tensor {base} is malformed ({e})")
    if parts:
        raise OpenClawError(f"{model_dir}: quantized tensor {next(iter(parts))} is missing some of its parts")


def save_quantized(path: Path, tensors: dict[str, torch.Tensor | QuantWeight]) -> None:
    """Write one safetensors shard in our quantized layout (what _internal_tensors reads back)."""
    flat, layouts = {}, {}
    for name, t in tensors.items():
        if isinstance(t, QuantWeight):
            assert not t.tiled, f"{name}: save the row-major weight (a tiled one is a GPU decode layout)"
            present = [p for p in _QPARTS if getattr(t, p) is not None]
            layouts[name] = [t.bits, t.group, *t.shape, t.zero]
            layouts[f"{name}#parts"] = present
            flat.update({f"{name}.{p}": getattr(t, p).contiguous().cpu() for p in present})
        else:
            flat[name] = t.contiguous().cpu()
    save_file(flat, str(path), metadata={"openclaw.quant": json.dumps(layouts)})


def checkpoint_tensors(model_dir: Path, raw: dict, device: torch.device | str = "cpu", nf4: bool = False,
                       dtype: torch.dtype = torch.float32, dense: tuple[str, ...] = ()
                       ) -> Iterator[tuple[str, torch.Tensor | QuantWeight]]:
    """Every tensor of the checkpoint by its checkpoint name, quantized weights as QuantWeight, streamed; nf4:
    quantize an unquantized checkpoint's linear layers to NF4 on the way, except names ending with one of `dense`
    (converters run on `device`); a synthetic checkpoint's random tensors are made there, full-precision ones in
    dtype."""
    method = quant_method(raw)
    if method is None and not nf4:
        return ((name, tensor) for _, name, tensor, _ in iter_safetensors(model_dir))
    if method == "openclaw":
        return _internal_tensors(model_dir)
    if method == synthetic.METHOD:
        family, cfg = parse_config(raw, model_dir)
        return synthetic.random_tensors(family, cfg, synthetic.layout_of(raw), device, dtype)
    return iter_quantized(model_dir, raw, device, nf4=nf4, dense=dense)


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype, nf4: bool = False,
               progress: Callable[[str, int, int], None] | None = None) -> torch.nn.Module:
    """The model with the checkpoint's weights on `device`: linear layers in dtype, or quantized (QuantLinear) when
    the checkpoint is (or nf4 asks to quantize it while loading); then embeddings and lm_head, and any tensor the
    checkpoint left unquantized, become 8-bit. progress(what, done, total) counts the model's weights as they land."""
    model_dir = Path(model_dir)
    family, cfg, raw = read_config(model_dir)
    quantized = (quant_method(raw) is not None and not _full_precision(raw)) or nf4
    with torch.device("meta"):
        model = family.model(cfg, quantized).to(dtype)
        for pname, p in model.named_parameters():
            if pname.endswith(family.fp32):  # MoE routers: expert selection sees the exact correction bias
                p.data = p.data.float()
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    qmodules = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    if quantized and cfg.tie_word_embeddings:
        del qmodules["lm_head.weight"]  # shares the embedding's weight, set below
    loaded: set[str] = set()
    expected = {f"{pname}#{i}" for pname in [*params, *qmodules]
                for i in range(max(1, len(family.packed_sizes(cfg, pname))))}
    method = quant_method(raw)
    what = "quantizing to NF4" if nf4 and method is None else f"loading {method} weights" if method else "loading"
    pending: dict[str, dict[int, QuantWeight]] = {}  # parts of a fused quantized weight until all have arrived
    for name, tensor in checkpoint_tensors(model_dir, raw, device, nf4, dtype, family.dense):
        target = family.checkpoint_target(cfg, name)
        if target is None or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        pname, index, nparts = target
        if pname not in params and pname not in qmodules:
            raise OpenClawError(f"{model_dir.name}: tensor {name} has no place in the {cfg.model_type} model; "
                                "is config.json from the same checkpoint?")
        tensor = family.sanitize(cfg, name, tensor)
        rows = family.packed_sizes(cfg, pname)[index] if index >= 0 else None
        if pname in qmodules:
            module = qmodules[pname]
            qw = _as_quantized(name, tensor, rows, module, device)
            if index < 0:
                _set_quantized(module, qw.to(device), dtype)
            else:
                parts = pending.setdefault(pname, {})
                parts[index] = qw
                if len(parts) == nparts:
                    _set_quantized(module, _fuse([parts[i] for i in range(nparts)], device, module.row_major), dtype)
                    del pending[pname]
        else:
            dst = params[pname].data
            if isinstance(tensor, QuantWeight):  # a weight the model holds in full precision (Family.dense)
                if len(tensor.shape) != 2 or not name.endswith(family.dense):
                    raise OpenClawError(f"tensor {name} is quantized but the model expects it in full precision")
                tensor = tensor.dequantize(dst.dtype)
            if index >= 0:
                dst = dst.narrow(0, sum(family.packed_sizes(cfg, pname)[:index]), rows)
            if dst.shape != tensor.shape:
                raise OpenClawError(f"tensor {name} has shape {tuple(tensor.shape)} but config.json implies "
                                    f"{tuple(dst.shape)}; the config and the weights disagree")
            dst.copy_(tensor)
        loaded.add(f"{pname}#{max(index, 0)}")
        if progress:
            progress(what, len(loaded & expected), len(expected))
    if quantized and cfg.tie_word_embeddings:
        model.lm_head.qweight = model.model.embed_tokens.qweight
    missing = sorted(expected - loaded)
    if missing:
        raise OpenClawError(f"{model_dir}: {len(missing)} weights missing from the checkpoint "
                            f"(first: {missing[0]}); the download may be incomplete")
    return model.eval()


def _full_precision(raw: dict) -> bool:
    """A synthetic checkpoint of a full-precision format (a bf16 manifest model): its weights are not quantized."""
    return quant_method(raw) == synthetic.METHOD and synthetic.layout_of(raw) is None


def _as_quantized(name: str, tensor: torch.Tensor | QuantWeight, rows: int | None, module: torch.nn.Module,
                  device: torch.device) -> QuantWeight:
    """A checkpoint tensor for a quantized module, checked against the shape config.json implies; full-precision
    tensors (embeddings, lm_head, layers a format leaves unquantized) are quantized to 8 bits here."""
    if isinstance(module, QuantEmbedding):
        shape = (module.num_embeddings, module.embedding_dim)
    else:
        shape = (module.out_features if rows is None else rows, module.in_features)
    got = tuple(tensor.shape)
    if got != shape:
        raise OpenClawError(f"tensor {name} has shape {got} but config.json implies {shape}; "
                            "the config and the weights disagree")
    if isinstance(tensor, QuantWeight):
        return tensor
    return quantize_rtn(tensor, 8, rtn_group(shape[1]), device=device)


def _fuse(parts: list[QuantWeight], device: torch.device, one: bool = False) -> QuantWeight | list[QuantWeight]:
    """A fused module's parts (q/k/v, gate/up, an MoE layer's experts) on `device`: stacked into one weight (one GEMV)
    when they share a layout or `one` asks for one weight (experts, which the MoE kernel reads by id), else kept as
    they are (QuantLinear runs one GEMV per part), so no part is widened to another's layout.
    openclaw.weights.sizes.quantized_weight_bytes counts by the same rule."""
    if one or len({p.layout for p in parts}) == 1:
        return concat_rows(parts).to(device)
    return [p.to(device) for p in parts]


def _set_quantized(module: torch.nn.Module, qw: QuantWeight | list[QuantWeight], dtype: torch.dtype) -> None:
    if isinstance(module, QuantEmbedding):
        module.qweight, module.dtype = qw, dtype
    elif dtype != torch.bfloat16 or module.row_major:  # the tensor-core GEMV takes bf16 rows; experts stay row-major
        module.qweight = qw
    elif isinstance(qw, list):  # linear weights in the order decode reads fastest (tiled on sm_80+)
        module.qweight = [tile(p) for p in qw]
    else:  # a fused [gate; up] that tiles gets its rows interleaved too, for the GEMV's SiLU epilogue
        module.interleaved = module.gated and module.bias is None and tiles(qw)
        module.qweight = tile(interleave_gate_up(qw) if module.interleaved else qw)
