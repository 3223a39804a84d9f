"""TriAttention for vectors made of several RoPE blocks (models/layers.BandLayout): MLA's [latent | RoPE key] keys and
absorbed queries (GLM-4.7-Flash), and the description of a model's bands that stats files record.

A block of width w is paired in the half layout (dim j with j + w/2); its bands follow the previous block's in the
statistics. The score of a key is the sum over blocks of kernels/tri_score.py's score of that block's dims against
that block's bands: the series is a sum over bands, and a frequency-0 band (a latent dim pair, GLM's unrotated half)
contributes mu_f . k_f + (A_f - |mu_f|) |k_f| at every distance. docs/glm.md says why MLA is scored this way. It does
not aggregate or select (openclaw.evict.evictor does) or capture queries (openclaw.evict.calibrate does).
"""

import torch

from openclaw.kernels.tri_score import tri_score
from openclaw.models.layers import BandLayout

Blocks = tuple[tuple[int, int], ...]


def band_parts(q: torch.Tensor, blocks: Blocks | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [..., D] -> (real, imaginary) parts [..., D/2] of its bands in band order (blocks None: one half block)."""
    if blocks is None:
        half = q.shape[-1] // 2
        return q[..., :half], q[..., half:]
    re = [q[..., s:s + w // 2] for s, w in blocks]
    im = [q[..., s + w // 2:s + w] for s, w in blocks]
    return torch.cat(re, dim=-1), torch.cat(im, dim=-1)


def tri_score_blocks(keys: torch.Tensor, mu_re: torch.Tensor, mu_im: torch.Tensor, a_mean: torch.Tensor,
                     omega: torch.Tensor, t: int, blocks: Blocks, terms: str = "both") -> torch.Tensor:
    """keys: [L, n, Hkv, D] post-RoPE; stats [L, H, F] and omega [F] in band order -> scores [L, H, n] fp32: one
    tri_score per block over a view of the keys (no copy), summed."""
    out, f0 = None, 0
    for start, width in blocks:
        f1 = f0 + width // 2
        part = tri_score(keys[..., start:start + width], mu_re[..., f0:f1], mu_im[..., f0:f1], a_mean[..., f0:f1],
                         omega[f0:f1], t, terms=terms)
        out = part if out is None else out + part
        f0 = f1
    return out


def layout_metadata(bands: BandLayout) -> dict:
    """What a stats file records of the bands its statistics are in: the checkpoint's RoPE pairing, the blocks and
    each band's frequency (0: a dim pair RoPE does not rotate)."""
    return {"rope_style": bands.rope_style, "blocks": [list(b) for b in bands.blocks],
            "inv_freq": [float(w) for w in bands.omega.tolist()]}
