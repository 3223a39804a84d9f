"""A checkpoint directory read without building anything: config.json (and the model family that defines its
model_type), generation_config.json, the safetensors shards, and which weight format they hold.

The leaf of openclaw.weights: the loader, the format readers and the size calculations share it, and it imports none
of them. It does not convert (openclaw.weights.formats) or load (openclaw.weights.loader) weights.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from openclaw.errors import OpenClawError
from openclaw.models import FAMILIES
from openclaw.models.family import Family


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise OpenClawError(f"{path} is missing: a model directory needs config.json and its safetensors files")
    except json.JSONDecodeError as e:
        raise OpenClawError(f"{path} is not valid JSON ({e}); re-download or re-convert the model")


def model_family(raw: dict, where: str | Path = "") -> Family:
    """The family that defines a config.json's model_type; refuses architectures we have no definition for."""
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        archs = ", ".join(raw.get("architectures") or []) or "?"
        raise OpenClawError(
            f"{where or 'this model'}: architecture {model_type!r} ({archs}) is not supported; "
            f"supported model types: {', '.join(sorted(FAMILIES))}")
    if raw.get("mlp_bias"):
        raise OpenClawError(f"{where}: Llama checkpoints with mlp_bias are not supported")
    return FAMILIES[model_type]


def parse_config(raw: dict, where: str | Path = "") -> tuple[Family, object]:
    """(family, its config dataclass) of a config.json dict: the one place a model's config is parsed."""
    family = model_family(raw, where)
    try:
        return family, family.config.from_dict(raw)
    except ValueError as e:  # a config the family does not define (the family says which field and why)
        raise OpenClawError(f"{where or 'this model'}: {e}") from None


def read_config(model_dir: Path) -> tuple[Family, object, dict]:
    """(family, its config dataclass, the raw config.json dict) of a model directory."""
    raw = read_json(Path(model_dir) / "config.json")
    return *parse_config(raw, model_dir), raw


def generation_defaults(model_dir: Path) -> dict:
    """The checkpoint's generation_config.json (sampling defaults, eos ids), or {} when it has none."""
    path = Path(model_dir) / "generation_config.json"
    return read_json(path) if path.exists() else {}


def shard_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
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


def iter_safetensors(model_dir: Path) -> Iterator[tuple[Path, str, torch.Tensor, dict]]:
    """(file, tensor name, tensor, file metadata) for every tensor of every shard, one tensor in memory at a time."""
    for path in shard_files(model_dir):
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise OpenClawError(f"{path} is unreadable or truncated ({e}); delete it and download it again")
        with f:
            meta = f.metadata() or {}
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError) as e:
                    raise OpenClawError(f"{path} is truncated or corrupt at tensor {name} ({e}); download it again")
                yield path, name, tensor, meta


def quant_method(raw: dict) -> str | None:
    """The checkpoint's quantization method (config.json quantization_config.quant_method), None when unquantized."""
    qc = raw.get("quantization_config")
    return None if not qc else str(qc.get("quant_method", "?")).lower()


def detect_format(model_dir: Path, raw: dict | None = None) -> str:
    """The checkpoint's weight format: "unquantized" (fp16/bf16/fp32 safetensors; NF4 at load if asked), "awq",
    "bitsandbytes", "gguf" (a directory openclaw.weights.gguf_import made with quantized=True), "openclaw" (our own
    layout, read by the loader) or "random" (openclaw.weights.synthetic: random weights, config.json only). Unknown or unsupported quantization_config settings raise OpenClawError."""
    raw = read_json(Path(model_dir) / "config.json") if raw is None else raw
    method = quant_method(raw)
    if method is None:
        return "unquantized"
    qc = raw["quantization_config"]
    if method == "awq":
        awq_group(model_dir, qc)
    elif method == "bitsandbytes":
        if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            raise OpenClawError(f"{model_dir}: 8-bit bitsandbytes (LLM.int8) checkpoints are not supported; use a "
                                "4-bit one (load_in_4bit) or the unquantized checkpoint, which is quantized at load")
        if qc.get("bnb_4bit_quant_type", "nf4") not in ("nf4", "fp4"):
            raise OpenClawError(f"{model_dir}: quantization_config.bnb_4bit_quant_type "
                                f"{qc['bnb_4bit_quant_type']!r} is unknown; expected nf4 or fp4")
    elif method not in ("gguf", "openclaw", "random"):
        raise OpenClawError(
            f"{model_dir}: quantization_config.quant_method {method!r} is not supported; supported are awq (4-bit "
            "GEMM), bitsandbytes (4-bit) and GGUF files, or use the unquantized checkpoint (quantized to NF4 at load)")
    return method


def awq_group(model_dir: Path, qc: dict) -> int:
    """The AWQ group size, after refusing variants whose packing or math differ from GEMM int4 with zero points."""
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size"))
    version = str(qc.get("version", "gemm")).lower()
    gemm = "'gemm' (GEMV, Marlin and ExLlama pack the same weights differently)"
    for ok, field, value, want in [(bits == 4, "bits", bits, "4"), (version == "gemm", "version", version, gemm),
                                   (qc.get("zero_point", True) is True, "zero_point", qc.get("zero_point"), "true"),
                                   (isinstance(group, int) and group > 0, "group_size", group, "a positive int")]:
        if not ok:
            raise OpenClawError(f"{model_dir}: AWQ quantization_config.{field} is {value!r}; OpenClaw reads only "
                                f"{field} = {want}. Use the official *-AWQ checkpoint or the unquantized one")
    return group
