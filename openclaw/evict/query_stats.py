"""Running sums of pre-RoPE queries per (layer, query head, RoPE band), and where they persist between sessions.

QueryStats adds up the exact vectors RoPE rotates (after q_norm / bias) in fp64, with the token count of each layer,
so one object serves offline calibration (openclaw.evict.calibrate) and online statistics (`--stats auto`, fed by the
compressor's query tap), and sums from several sessions add up. `save_sums` / `load_sums` keep them per model in the
cache (`running_path`), so the next session warm-starts. It does not read the reference's files (stats_file.py) or
score keys (evictor.py).
"""

import logging
import os
import pickle
from pathlib import Path

import torch

from openclaw.errors import OpenClawError
from openclaw.evict.evictor import TriStats

log = logging.getLogger(__name__)
SUMS_FORMAT = "openclaw-query-sums/1"
# metadata that must match for saved sums to describe this model (the rest, e.g. the token count, is informative)
MUST_MATCH = ("num_layers", "num_attention_heads", "head_dim", "rope_style", "rotary_dim", "query_capture")


class QueryStats:
    """Sums of q_f, |q_f| over tokens, per (layer, query head, band) in fp64, and tokens per layer; means on demand."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, device: torch.device | str = "cpu"):
        self.shape = (num_layers, num_heads, head_dim // 2)
        self.re = torch.zeros(self.shape, dtype=torch.float64, device=device)
        self.im = torch.zeros_like(self.re)
        self.abs = torch.zeros_like(self.re)
        self.count = torch.zeros(num_layers, dtype=torch.float64)

    def update(self, layer: int, q: torch.Tensor) -> None:
        """q: [T, H, D] pre-RoPE queries of one layer ("half" layout: band f is dims f and f + D/2)."""
        half = q.shape[-1] // 2
        re, im = q[..., :half].double(), q[..., half:].double()
        self.re[layer] += re.sum(0).to(self.re.device)
        self.im[layer] += im.sum(0).to(self.re.device)
        self.abs[layer] += torch.sqrt(re * re + im * im).sum(0).to(self.re.device)
        self.count[layer] += q.shape[0]

    def add(self, other: "QueryStats") -> None:
        """Fold another's sums into these (sessions, traces and texts add up)."""
        if other.shape != self.shape:
            raise ValueError(f"query sums of shape {other.shape} cannot join {self.shape}")
        for mine, theirs in ((self.re, other.re), (self.im, other.im), (self.abs, other.abs)):
            mine += theirs.to(mine.device)
        self.count += other.count

    def copy(self) -> "QueryStats":
        out = QueryStats(self.shape[0], self.shape[1], 2 * self.shape[2], self.re.device)
        out.add(self)
        return out

    @property
    def tokens(self) -> int:
        return int(self.count.min())

    def tri_stats(self, omega: torch.Tensor) -> TriStats:
        if self.tokens == 0:
            raise OpenClawError("no queries seen yet: online statistics are empty")
        c = self.count.to(self.re.device)[:, None, None]
        return TriStats((self.re / c).float(), (self.im / c).float(), (self.abs / c).float(), omega.float())


class StatsTap:
    """A BatchMeta.query_tap that feeds every layer's pre-RoPE queries to a QueryStats."""

    def __init__(self, stats: QueryStats, num_layers: int):
        self.stats, self.num_layers, self.calls = stats, num_layers, 0

    def __call__(self, q_pre: torch.Tensor, q_post: torch.Tensor) -> None:
        self.stats.update(self.calls % self.num_layers, q_pre)
        self.calls += 1


def running_path(cache_dir: Path, model_name: str) -> Path:
    """Where a model's online statistics persist: one file per model name in the cache."""
    return Path(cache_dir) / "stats" / f"{model_name}.pt"


def save_sums(path: Path, stats: QueryStats, metadata: dict) -> None:
    """Write the sums (fp64) and token counts with the model's metadata; atomically, so a reader never sees half a
    file (two sessions of one model: the last to finish wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": SUMS_FORMAT, "metadata": dict(metadata, tokens=stats.tokens),
               "re": stats.re.cpu(), "im": stats.im.cpu(), "abs": stats.abs.cpu(), "count": stats.count.cpu()}
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    torch.save(payload, part)
    part.replace(path)


def load_sums(path: Path, metadata: dict, device: torch.device | str = "cpu") -> QueryStats | None:
    """The sums saved for this model, or None (with a log line) when there are none or they describe another model
    (different shapes, RoPE layout or capture point): the session then starts cold and overwrites them."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        log.warning("ignoring unreadable online statistics %s (%s); starting cold", path, e)
        return None
    meta = data.get("metadata", {}) if isinstance(data, dict) else {}
    if not isinstance(data, dict) or data.get("format") != SUMS_FORMAT:
        log.warning("ignoring %s: not OpenClaw's online statistics; starting cold", path)
        return None
    wrong = [k for k in MUST_MATCH if meta.get(k) != metadata.get(k)]
    freq = meta.get("inv_freq")
    if freq is None or not torch.allclose(torch.as_tensor(freq).double(), torch.as_tensor(metadata["inv_freq"]).double(),
                                          rtol=1e-6, atol=0):
        wrong.append("inv_freq")
    if wrong:
        log.warning("ignoring online statistics %s: their %s differ from this model's; starting cold", path,
                    ", ".join(wrong))
        return None
    L, H, D = metadata["num_layers"], metadata["num_attention_heads"], metadata["head_dim"]
    stats = QueryStats(L, H, D, device)
    if data["re"].shape != stats.shape:
        log.warning("ignoring online statistics %s: shape %s, expected %s", path, tuple(data["re"].shape), stats.shape)
        return None
    stats.re += data["re"].to(stats.re.device)
    stats.im += data["im"].to(stats.re.device)
    stats.abs += data["abs"].to(stats.re.device)
    stats.count += data["count"].double()
    return stats
