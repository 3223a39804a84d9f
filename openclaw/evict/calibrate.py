"""TriAttention calibration: pre-RoPE query statistics per (layer, query head), their file format, and a report.

QueryStats accumulates sums of the exact vectors RoPE rotates (after q_norm / bias) in fp64 (kernels/query_stats.py,
device ops only, so a captured decode step adds to them too), so the same object serves offline calibration over a
text and online statistics (`--stats auto`, running means of the queries the model computes anyway). Files use the
reference plugin's format (TRIATTENTION.md section 2) and load with torch.load(weights_only=True). It does not score
or evict (openclaw.evict.evictor does).
"""

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from openclaw.config import SamplingParams
from openclaw.engine.graphs import StepTap
from openclaw.engine.kv_pool import KVPool
from openclaw.engine.runner import Runner
from openclaw.engine.scheduler import Scheduler
from openclaw.engine.sequence import Sequence
from openclaw.errors import OpenClawError
from openclaw.evict.bands import Blocks, layout_metadata
from openclaw.evict.evictor import TriStats
from openclaw.kernels.query_stats import query_stats
from openclaw.models.layers import BandLayout

ROPE_STYLE = "half"  # our Rope pairs dim j with j + D/2 (HF Llama / Qwen layout); GLM's files say "interleaved"


class QueryStats:
    """Running sums of q_f, |q_f| over tokens, per (layer, query head, band), on the queries' device; means on demand.
    blocks: the model's RoPE blocks (BandLayout.blocks; None: one half-layout block). tokens: how many tokens every
    layer has added, counted on the host by whoever feeds it (a device-only add cannot count without a sync)."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, device: torch.device | str = "cpu",
                 blocks: Blocks | None = None):
        self.shape = (num_layers, num_heads, head_dim // 2)
        self.blocks = blocks
        self.re = torch.zeros(self.shape, dtype=torch.float64, device=device)
        self.im = torch.zeros_like(self.re)
        self.abs = torch.zeros_like(self.re)
        self.tokens = 0

    def add(self, layer: int, q: torch.Tensor, slots: torch.Tensor | None = None) -> None:
        """q: [T, H, D] pre-RoPE queries of one layer, on the stats' device; rows whose slot is negative (padding)
        are skipped. Each RoPE block adds to its own bands (a column range of the sums)."""
        f0 = 0
        for start, width in self.blocks or ((0, q.shape[-1]),):
            f1 = f0 + width // 2
            query_stats(q[..., start:start + width], slots, self.re[layer, :, f0:f1], self.im[layer, :, f0:f1],
                        self.abs[layer, :, f0:f1])
            f0 = f1

    def tri_stats(self, omega: torch.Tensor) -> TriStats:
        if self.tokens == 0:
            raise OpenClawError("no queries seen yet: online statistics are empty")
        return TriStats((self.re / self.tokens).float(), (self.im / self.tokens).float(),
                        (self.abs / self.tokens).float(), omega.float())


def save_stats(path: Path, stats: TriStats, model_name: str, num_kv_heads: int, tokens: int,
               bands: BandLayout | None = None) -> None:
    """Write the reference format: {"metadata": {...}, "stats": {"layer00_head05": {q_mean_real, ...}}}; bands: the
    model's band layout, recorded beside (evict/bands.layout_metadata). Written through a temporary file renamed
    into place: an interrupted write never leaves a file that half loads."""
    L, H, F = stats.mu_re.shape
    payload = {"metadata": {"sampled_heads": [[layer, h] for layer in range(L) for h in range(H)],
                            "head_dim": 2 * F, "rope_style": ROPE_STYLE, "model_name": model_name,
                            "num_layers": L, "num_attention_heads": H, "num_key_value_heads": num_kv_heads,
                            "calibration_tokens": tokens} | ({} if bands is None else layout_metadata(bands)),
               "stats": {f"layer{layer:02d}_head{h:02d}": {"q_mean_real": stats.mu_re[layer, h].cpu().contiguous(),
                                                            "q_mean_imag": stats.mu_im[layer, h].cpu().contiguous(),
                                                            "q_abs_mean": stats.a_mean[layer, h].cpu().contiguous()}
                         for layer in range(L) for h in range(H)}}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OpenClawError(f"could not write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_stats(path: Path, num_layers: int, num_heads: int, head_dim: int, omega: torch.Tensor,
               bands: BandLayout | None = None) -> TriStats:
    """Read a stats file (ours or the reference plugin's) for a model of these shapes (and band layout, when given);
    refuse any mismatch, and any malformed file, with one line."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise OpenClawError(f"stats file {path} does not exist; make one with `openclaw calibrate`")
    except pickle.UnpicklingError:  # torch's text here suggests weights_only=False, which would run the file's code
        raise OpenClawError(f"{path} is not a stats file: it is not a torch.save file of tensors and plain data; "
                            "make one with `openclaw calibrate`") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""  # torch's refusals run over many lines
        raise OpenClawError(f"{path} is not a loadable stats file ({type(e).__name__}: {first})") from None
    if not (isinstance(data, dict) and isinstance(data.get("metadata"), dict) and isinstance(data.get("stats"), dict)):
        raise OpenClawError(f"{path} is not a TriAttention stats file (expected 'metadata' and 'stats' dicts)")
    try:
        return _parse_stats(path, data, num_layers, num_heads, head_dim, omega, bands)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as e:  # fields of wrong kinds
        raise OpenClawError(f"{path} is a malformed stats file ({type(e).__name__}: {e}); calibrate again with "
                            "`openclaw calibrate`") from None


def _parse_stats(path: Path, data: dict, num_layers: int, num_heads: int, head_dim: int, omega: torch.Tensor,
                 bands: BandLayout | None) -> TriStats:
    meta = data["metadata"]
    name = meta.get("model_name", "?")
    if meta.get("head_dim") != head_dim:
        raise OpenClawError(f"{path} was calibrated for head_dim {meta.get('head_dim')} ({name}) but this model has "
                            f"head_dim {head_dim}; calibrate this model with `openclaw calibrate`")
    style = ROPE_STYLE if bands is None else bands.rope_style
    if meta.get("rope_style", ROPE_STYLE) != style:
        raise OpenClawError(f"{path} pairs RoPE dims as {meta.get('rope_style')!r}; this model uses {style!r}")
    if bands is not None and meta.get("blocks", [[0, head_dim]]) != [list(b) for b in bands.blocks]:
        raise OpenClawError(f"{path} describes RoPE blocks {meta.get('blocks', [[0, head_dim]])} ({name}) but this "
                            f"model's are {[list(b) for b in bands.blocks]}; calibrate this model")
    for key, ours in (("num_layers", num_layers), ("num_attention_heads", num_heads)):
        if key in meta and meta[key] != ours:
            raise OpenClawError(f"{path} has {key} {meta[key]} ({name}) but this model has {ours}; "
                                "it comes from a different model")
    heads = {(int(layer), int(h)) for layer, h in meta.get("sampled_heads", [])}
    wanted = {(layer, h) for layer in range(num_layers) for h in range(num_heads)}
    if heads != wanted:
        extra = sorted(heads - wanted)[:3]
        raise OpenClawError(f"{path} covers {len(heads)} (layer, head) pairs but this model has {len(wanted)} "
                            f"({num_layers} layers x {num_heads} query heads)"
                            + (f"; e.g. {extra} do not exist here" if extra else "") + ": a different model?")
    F = head_dim // 2
    out = torch.zeros(3, num_layers, num_heads, F)
    for layer, h in wanted:
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
    return TriStats(out[0], out[1], out[2], omega.float())


class StatsTaps:
    """Runner taps (openclaw.engine.runner.Taps) that feed every layer's pre-RoPE queries to a QueryStats."""

    graphable = True

    def __init__(self, stats: QueryStats, num_layers: int):
        self.stats, self.num_layers = stats, num_layers

    def tap(self, batch: list[tuple[Sequence, int]]) -> StepTap:
        self.stats.tokens += sum(n for _, n in batch)
        return StepTap([], [], self._bind)

    def _bind(self, inputs: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor):
        calls = iter(range(1 << 62))

        def record(q_pre: torch.Tensor, q_post: torch.Tensor) -> None:
            self.stats.add(next(calls) % self.num_layers, q_pre, slots)

        return record


@torch.inference_mode()
def calibrate(model: torch.nn.Module, ids: list[int], context: int = 4096, chunk: int = 512,
              progress: Callable[[str, int, int], None] | None = None) -> QueryStats:
    """Run ids through the model in independent contexts of `context` tokens, in chunks of `chunk` through the
    engine's scheduler and runner; accumulate pre-RoPE query stats. progress(what, tokens done, tokens) after each
    chunk."""
    cfg, bands = model.config, model.bands
    norm = model.model.norm.weight  # a plain parameter in the activation dtype, also when the embedding is quantized
    device, dtype = norm.device, norm.dtype
    stats = QueryStats(cfg.num_hidden_layers, cfg.num_attention_heads, bands.width, device, blocks=bands.blocks)
    taps = StatsTaps(stats, cfg.num_hidden_layers)
    pool = KVPool.for_config(cfg, context, dtype, device)
    runner = Runner(model, pool, device)
    for start in range(0, len(ids), context):
        window = ids[start:start + context]
        seq = Sequence(window, SamplingParams(max_tokens=1), max_len=len(window))
        scheduler = Scheduler(pool.allocator, max_seqs=1, max_batch_tokens=chunk)
        scheduler.add(seq)
        while seq.num_computed < len(window):
            batch = scheduler.schedule()
            runner.step(batch, taps, rows=[])
            scheduler.advance(batch)
            if progress:
                progress("calibrating", start + seq.num_computed, len(ids))
        scheduler.finish(seq, "length")
    return stats


@dataclass
class Concentration:
    """Per layer: the A-weighted mean R over heads and bands, and the share of heads whose dominant bands have
    R > 0.95 (dominant: the top eighth of bands by E|q_f|, at least one; R averaged over them, weighted by A)."""

    mean_r: list[float]
    share_concentrated: list[float]

    @property
    def overall_share(self) -> float:
        return sum(self.share_concentrated) / len(self.share_concentrated)


def concentration(stats: TriStats, threshold: float = 0.95) -> Concentration:
    a = stats.a_mean.clamp_min(1e-12)
    r = torch.sqrt(stats.mu_re ** 2 + stats.mu_im ** 2) / a  # [L, H, F]
    mean_r = ((r * a).sum((1, 2)) / a.sum((1, 2))).tolist()
    return Concentration(mean_r, (dominant_r(stats) > threshold).float().mean(-1).tolist())


def dominant_r(stats: TriStats) -> torch.Tensor:
    """[L, H] the A-weighted R of each head's dominant bands (as in the concentration report)."""
    a = stats.a_mean.clamp_min(1e-12)
    r = torch.sqrt(stats.mu_re ** 2 + stats.mu_im ** 2) / a
    idx = a.topk(max(1, a.shape[-1] // 8), dim=-1).indices
    return (r.gather(-1, idx) * a.gather(-1, idx)).sum(-1) / a.gather(-1, idx).sum(-1)
