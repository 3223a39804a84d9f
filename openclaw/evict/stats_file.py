"""TriAttention statistics files in the reference plugin's format (TRIATTENTION.md section 2), read and written.

`{"metadata": {"sampled_heads": [[layer, head], ...], "head_dim", "rope_style", ...}, "stats": {"layer00_head05":
{"q_mean_real", "q_mean_imag", "q_abs_mean"}}}`, loaded with torch.load(weights_only=True). Ours also record what the
reference's lack: the band layout (evict/bands.layout_metadata: RoPE pairing, blocks, each band's frequency), rope
theta and type, and where the queries were captured (`query_capture`: the vectors RoPE rotates, i.e. after q_norm and
the q bias), so a file is checked against the model it is used with. Files that cover a subset of heads load (the
selection falls back per KV head, as the reference does); a mismatch or a malformed file is one OpenClawError line.
The online statistics OpenClaw keeps in its cache (query_stats.save_sums) load here too. It does not accumulate
(query_stats.py).
"""

import logging
import os
import pickle
from pathlib import Path

import torch

from openclaw.errors import OpenClawError
from openclaw.evict.bands import layout_metadata
from openclaw.evict.evictor import TriStats
from openclaw.evict.query_stats import SUMS_FORMAT, load_sums

log = logging.getLogger(__name__)
CAPTURE = "rope_input"  # the exact vectors RoPE rotates: after q_norm (Qwen3) and after the q bias (Qwen2)


def model_metadata(model: torch.nn.Module, name: str) -> dict:
    """What a statistics file records about the model it describes (and is checked against when loaded): shapes,
    the band layout of the vectors TriAttention scores (model.bands), rope theta / type, the capture point."""
    mc, bands = model.config, model.bands
    return {"model_name": name, "num_layers": mc.num_hidden_layers, "num_attention_heads": mc.num_attention_heads,
            "num_key_value_heads": mc.cache_shape()[0], "head_dim": bands.width,
            "rope_theta": float(mc.rope.get("rope_theta", 0.0)), "rope_type": mc.rope.get("rope_type", "default"),
            "query_capture": CAPTURE, "q_norm": bool(getattr(mc, "qk_norm", False))} | layout_metadata(bands)


def save_stats(path: Path, stats: TriStats, metadata: dict, tokens: int) -> None:
    """Write the reference format for every (layer, query head) of stats that has statistics, with metadata
    (model_metadata). Written through a temporary file renamed into place: an interrupted write never leaves a file
    that half loads."""
    L, H, _ = stats.mu_re.shape
    heads = stats.sampled()
    sampled = [[layer, h] for layer in range(L) for h in range(H) if heads[layer, h]]
    payload = {"metadata": dict(metadata, sampled_heads=sampled, calibration_tokens=tokens),
               "stats": {f"layer{layer:02d}_head{h:02d}": {"q_mean_real": stats.mu_re[layer, h].cpu().contiguous(),
                                                            "q_mean_imag": stats.mu_im[layer, h].cpu().contiguous(),
                                                            "q_abs_mean": stats.a_mean[layer, h].cpu().contiguous()}
                         for layer, h in sampled}}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OpenClawError(f"could not write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_stats(path: Path, model: dict, omega: torch.Tensor) -> TriStats:
    """Read a stats file (ours, the reference plugin's, or the online statistics OpenClaw keeps in its cache) for the
    model described by `model` (model_metadata); refuse any mismatch and any malformed file with one line. Heads the
    file does not list are marked in TriStats.heads."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise OpenClawError(f"stats file {path} does not exist; make one with `openclaw calibrate`") from None
    except pickle.UnpicklingError:  # torch's text here suggests weights_only=False, which would run the file's code
        raise OpenClawError(f"{path} is not a stats file: it is not a torch.save file of tensors and plain data; "
                            "make one with `openclaw calibrate`") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""  # torch's refusals run over many lines
        raise OpenClawError(f"{path} is not a loadable stats file ({type(e).__name__}: {first})") from None
    if isinstance(data, dict) and data.get("format") == SUMS_FORMAT:
        sums = load_sums(Path(path), model)
        if sums is None or sums.tokens == 0:
            raise OpenClawError(f"{path} holds online statistics of another model (or none); see the warning above")
        return sums.tri_stats(omega)
    if not (isinstance(data, dict) and isinstance(data.get("metadata"), dict) and isinstance(data.get("stats"), dict)):
        raise OpenClawError(f"{path} is not a TriAttention stats file (expected 'metadata' and 'stats' dicts)")
    try:
        return _parse(path, data, model, omega)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as e:  # fields of wrong kinds
        raise OpenClawError(f"{path} is a malformed stats file ({type(e).__name__}: {e}); calibrate again with "
                            "`openclaw calibrate`") from None


def _check_layout(path: Path, meta: dict, model: dict) -> None:
    name = meta.get("model_name", "?")
    if meta.get("head_dim") != model["head_dim"]:
        raise OpenClawError(f"{path} was calibrated for head_dim {meta.get('head_dim')} ({name}) but this model has "
                            f"head_dim {model['head_dim']}; calibrate this model with `openclaw calibrate`")
    if meta.get("rope_style", "half") != model["rope_style"]:
        raise OpenClawError(f"{path} pairs RoPE dims as {meta.get('rope_style')!r}; this model uses "
                            f"{model['rope_style']!r}")
    if meta.get("blocks", [[0, model["head_dim"]]]) != model["blocks"]:
        raise OpenClawError(f"{path} describes RoPE blocks {meta.get('blocks')} ({name}) but this model's are "
                            f"{model['blocks']}; calibrate this model")
    for key in ("rope_type", "num_layers", "num_attention_heads"):  # KV heads: the scores are per query head
        if key in meta and meta[key] != model[key]:
            raise OpenClawError(f"{path} has {key} {meta[key]!r} ({name}) but this model has {model[key]!r}; it comes "
                                "from a different model or RoPE layout")
    if "inv_freq" in meta:
        theirs, ours = torch.as_tensor(meta["inv_freq"]).double().flatten(), torch.tensor(model["inv_freq"]).double()
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-5, atol=0):
            raise OpenClawError(f"{path} was calibrated with other RoPE frequencies ({name}: inv_freq "
                                f"{theirs[:3].tolist()}...) than this model's ({ours[:3].tolist()}...)")
    elif "rope_theta" in meta and abs(float(meta["rope_theta"]) - model["rope_theta"]) > 1e-6 * model["rope_theta"]:
        raise OpenClawError(f"{path} has rope_theta {meta['rope_theta']} ({name}) but this model has "
                            f"{model['rope_theta']}")


def _parse(path: Path, data: dict, model: dict, omega: torch.Tensor) -> TriStats:
    meta = data["metadata"]
    _check_layout(path, meta, model)
    if meta.get("query_capture") is None and model["q_norm"]:
        log.warning("%s does not say where its queries were captured; the reference's calibrate script takes Qwen3 "
                    "queries before q_norm, which gives wrong statistics: recalibrate with `openclaw calibrate`", path)
    elif meta.get("query_capture", CAPTURE) != CAPTURE:
        raise OpenClawError(f"{path} captured its queries at {meta['query_capture']!r}; OpenClaw scores with the "
                            f"vectors RoPE rotates ({CAPTURE!r})")
    L, H, F = model["num_layers"], model["num_attention_heads"], model["head_dim"] // 2
    listed = {(int(layer), int(h)) for layer, h in meta.get("sampled_heads", [])}
    outside = sorted((layer, h) for layer, h in listed if not (0 <= layer < L and 0 <= h < H))
    if outside or not listed:
        raise OpenClawError(f"{path} lists {len(listed)} (layer, head) pairs"
                            + (f", e.g. {outside[:3]}, outside this model's {L} layers x {H} query heads" if outside
                               else ", none") + ": a different model?")
    out = torch.zeros(3, L, H, F)
    heads = torch.zeros(L, H, dtype=torch.bool)
    for layer, h in listed:
        entry = data["stats"].get(f"layer{layer:02d}_head{h:02d}")
        if entry is None:
            raise OpenClawError(f"{path} lists layer {layer} head {h} but has no stats for it")
        for i, field in enumerate(("q_mean_real", "q_mean_imag", "q_abs_mean")):
            x = torch.as_tensor(entry[field]).float().flatten()
            if x.numel() != F:
                raise OpenClawError(f"{path}: {field} of layer {layer} head {h} has {x.numel()} bands, expected {F}")
            if not torch.isfinite(x).all():
                raise OpenClawError(f"{path}: {field} of layer {layer} head {h} is not finite; calibrate again")
            out[i, layer, h] = x
        heads[layer, h] = True
    if not heads.all():
        log.info("%s covers %d of %d query heads; the others fall back as the reference does", path,
                 int(heads.sum()), L * H)
    return TriStats(out[0], out[1], out[2], omega.float(), None if heads.all() else heads)
