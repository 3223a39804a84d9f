"""Running sums of pre-RoPE queries per (layer, query head, RoPE band), and where they persist between sessions.

QueryStats adds up the exact vectors RoPE rotates (after q_norm / bias) in fp64 through kernels/query_stats.py
(device ops only, so a captured decode step adds to them too), block by block of the model's band layout
(models/layers.BandLayout), with the token count kept on the host by whoever feeds it. One object serves offline
calibration (openclaw.evict.calibrate) and online statistics (`--stats auto`, fed by the compressor's tap), and sums
from several sessions add up (`merge`). `save_sums` / `load_sums` keep them per model in the cache (`running_path`),
so the next session warm-starts. It does not read the reference's files (stats_file.py) or score keys (evictor.py).
"""

import logging
import os
import pickle
from pathlib import Path

import torch

from openclaw.errors import OpenClawError
from openclaw.evict.bands import Blocks
from openclaw.evict.evictor import TriStats
from openclaw.kernels.query_stats import query_stats

log = logging.getLogger(__name__)
SUMS_FORMAT = "openclaw-query-sums/1"
# metadata that must match for saved sums to describe this model (the rest, e.g. the token count, is informative)
MUST_MATCH = ("num_layers", "num_attention_heads", "head_dim", "rope_style", "blocks", "query_capture")


class QueryStats:
    """Running sums of q_f, |q_f| over tokens, per (layer, query head, band), in fp64 on the queries' device; means
    on demand. blocks: the model's RoPE blocks (BandLayout.blocks; None: one half-layout block). tokens: how many
    tokens every layer has added, counted on the host by whoever feeds it (a device-only add cannot count without a
    sync)."""

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

    def merge(self, other: "QueryStats") -> None:
        """Fold another's sums and token count into these (sessions, traces and texts add up)."""
        if other.shape != self.shape:
            raise ValueError(f"query sums of shape {other.shape} cannot join {self.shape}")
        for mine, theirs in ((self.re, other.re), (self.im, other.im), (self.abs, other.abs)):
            mine += theirs.to(mine.device)
        self.tokens += other.tokens

    def copy(self) -> "QueryStats":
        out = QueryStats(self.shape[0], self.shape[1], 2 * self.shape[2], self.re.device, self.blocks)
        out.merge(self)
        return out

    def tri_stats(self, omega: torch.Tensor) -> TriStats:
        if self.tokens == 0:
            raise OpenClawError("no queries seen yet: online statistics are empty")
        return TriStats((self.re / self.tokens).float(), (self.im / self.tokens).float(),
                        (self.abs / self.tokens).float(), omega.float())


def running_path(cache_dir: Path, model_name: str) -> Path:
    """Where a model's online statistics persist: one file per model name in the cache."""
    return Path(cache_dir) / "stats" / f"{model_name}.pt"


def save_sums(path: Path, stats: QueryStats, metadata: dict) -> None:
    """Write the sums (fp64) and token count with the model's metadata (stats_file.model_metadata); atomically, so a
    reader never sees half a file (two sessions of one model: the last to finish wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": SUMS_FORMAT, "metadata": dict(metadata, tokens=stats.tokens),
               "re": stats.re.cpu(), "im": stats.im.cpu(), "abs": stats.abs.cpu()}
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        torch.save(payload, part)
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)


def load_sums(path: Path, metadata: dict, device: torch.device | str = "cpu") -> QueryStats | None:
    """The sums saved for this model, or None (with a log line) when there are none or they describe another model
    (different shapes, RoPE layout or capture point): the session then starts cold and overwrites them."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        log.warning("ignoring unreadable online statistics %s (%s); starting cold", path, str(e).splitlines()[0:1])
        return None
    if not isinstance(data, dict) or data.get("format") != SUMS_FORMAT or not isinstance(data.get("metadata"), dict):
        log.warning("ignoring %s: not OpenClaw's online statistics; starting cold", path)
        return None
    meta = data["metadata"]
    wrong = [k for k in MUST_MATCH if meta.get(k) != metadata.get(k)]
    freq = meta.get("inv_freq")
    ours = torch.as_tensor(metadata["inv_freq"]).double()
    if freq is None or torch.as_tensor(freq).shape != ours.shape or not torch.allclose(
            torch.as_tensor(freq).double(), ours, rtol=1e-6, atol=0):
        wrong.append("inv_freq")
    if wrong:
        log.warning("ignoring online statistics %s: their %s differ from this model's; starting cold", path,
                    ", ".join(wrong))
        return None
    L, H, D = metadata["num_layers"], metadata["num_attention_heads"], metadata["head_dim"]
    stats = QueryStats(L, H, D, device, tuple(tuple(b) for b in metadata["blocks"]))
    parts = [data.get(k) for k in ("re", "im", "abs")]
    if not all(isinstance(x, torch.Tensor) and x.shape == stats.shape and torch.isfinite(x).all() for x in parts) \
            or not isinstance(meta.get("tokens"), int) or meta["tokens"] < 0:
        log.warning("ignoring malformed online statistics %s (expected sums of shape %s); starting cold", path,
                    stats.shape)
        return None
    for mine, theirs in zip((stats.re, stats.im, stats.abs), parts):
        mine += theirs.double().to(mine.device)
    stats.tokens = meta["tokens"]
    return stats
