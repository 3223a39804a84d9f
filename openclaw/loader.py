"""Loads a Hugging Face model directory (config.json + safetensors shards) into our model definitions.

The model is built on the meta device and materialized once at its final dtype/device; checkpoint tensors
are then read one at a time and copied in, so memory never holds two copies of the weights.
It does not find or download models (openclaw.hub) or convert GGUF files (openclaw.gguf_import).
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from openclaw.errors import OpenClawError
from openclaw.models import qwen3

# config.json model_type -> the family file that defines it
FAMILIES = {arch: qwen3 for arch in qwen3.ARCHITECTURES}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise OpenClawError(f"{path} is missing: a model directory needs config.json and its safetensors files")
    except json.JSONDecodeError as e:
        raise OpenClawError(f"{path} is not valid JSON ({e}); re-download or re-convert the model")


def read_config(model_dir: Path) -> tuple[object, dict]:
    """(family module, raw config dict); refuses architectures we have no definition for."""
    cfg = read_json(Path(model_dir) / "config.json")
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        archs = ", ".join(cfg.get("architectures") or []) or "?"
        raise OpenClawError(
            f"{model_dir}: architecture {model_type!r} ({archs}) is not supported; "
            f"supported model types: {', '.join(sorted(FAMILIES))}")
    if cfg.get("mlp_bias"):
        raise OpenClawError(f"{model_dir}: Llama checkpoints with mlp_bias are not supported")
    return FAMILIES[model_type], cfg


def generation_defaults(model_dir: Path) -> dict:
    """The checkpoint's generation_config.json (sampling defaults, eos ids), or {} when it has none."""
    path = Path(model_dir) / "generation_config.json"
    return read_json(path) if path.exists() else {}


def shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(read_json(index)["weight_map"].values()))
        files = [model_dir / n for n in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise OpenClawError(
                f"{model_dir}: shard(s) {', '.join(missing)} listed in model.safetensors.index.json are missing; "
                "finish the download (openclaw pull) or copy them in")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise OpenClawError(f"{model_dir} has no *.safetensors weights")
    return files


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA; float16 on the CPU, where this torch's fp16 GEMV reads weights ~1.8x faster than
    bf16 and keeps more mantissa (bench/cpu_decode.py: fp16 greedy matches fp32 token for token, bf16 does not).
    The engine refuses to go on if fp16 overflows (non-finite logits) and names the fix."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float16
    return getattr(torch, name)


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    model_dir = Path(model_dir)
    family, raw = read_config(model_dir)
    cfg = family.Qwen3Config.from_dict(raw)
    with torch.device("meta"):
        model = family.Qwen3ForCausalLM(cfg).to(dtype)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for path in shard_files(model_dir):
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise OpenClawError(f"{path} is unreadable or truncated ({e}); delete it and download it again")
        with f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                target = family.checkpoint_target(name)
                if target is None or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                pname, index, _ = target
                if pname not in params:
                    raise OpenClawError(f"{path.name}: tensor {name} has no place in the {cfg.model_type} model; "
                                        "is config.json from the same checkpoint?")
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError) as e:
                    raise OpenClawError(f"{path} is truncated or corrupt at tensor {name} ({e}); download it again")
                dst = params[pname].data
                if index >= 0:
                    sizes = family.packed_sizes(cfg, pname.split(".")[-2])
                    dst = dst.narrow(0, sum(sizes[:index]), sizes[index])
                if dst.shape != tensor.shape:
                    raise OpenClawError(f"tensor {name} has shape {tuple(tensor.shape)} but config.json implies "
                                        f"{tuple(dst.shape)}; the config and the weights disagree")
                dst.copy_(tensor)
                loaded.add(f"{pname}#{max(index, 0)}")
    expected = {f"{pname}#{i}" for pname in params
                for i in range(len(family.PACKED.get(pname.split(".")[-2], "x")))}
    missing = sorted(expected - loaded)
    if missing:
        raise OpenClawError(f"{model_dir}: {len(missing)} weights missing from the checkpoint "
                            f"(first: {missing[0]}); the download may be incomplete")
    return model.eval()

