"""Logits -> next tokens, one SamplingParams per row, in Hugging Face's order and with its semantics: repetition
penalty, temperature, top-k, top-p, min-p, then a draw.

Sampler is what the engine runs, on the logits' device: each row's parameters go up in one copy, the draw is an
inverse CDF at one uniform number per row drawn on the host (from the row's seeded generator, else torch's global
one: a seed gives the same tokens whatever the batch and the device), the penalty reads a device bitmap of each
sequence's tokens, and the tokens come back in one copy: the step's only device-to-host transfer. A row whose
logits are not all finite gets token -1 (the engine ends that sequence). `sample` is the reference, per row with
torch.multinomial and host histories: the oracle the Sampler is tested against. Neither fills defaults
(SamplingParams.with_defaults does).
"""

import torch

from openclaw.config import SamplingParams
from openclaw.engine.sequence import Sequence


def _temperature(p: SamplingParams) -> float:
    return 1.0 if p.temperature is None else p.temperature


def _penalty(p: SamplingParams) -> float:
    return 1.0 if p.repetition_penalty is None else p.repetition_penalty


def _filters_anything(p: SamplingParams) -> bool:
    return bool(p.top_k) or (p.top_p is not None and p.top_p < 1) or bool(p.min_p)


def apply_repetition_penalty(logits: torch.Tensor, params: list[SamplingParams],
                             histories: list[list[int]] | None) -> torch.Tensor:
    """CTRL's penalty as HF applies it: a seen token's logit is divided by p when positive, else multiplied."""
    if histories is None:
        return logits
    for i, (p, history) in enumerate(zip(params, histories)):
        penalty = _penalty(p)
        if penalty == 1.0 or not history:
            continue
        ids = torch.tensor(history, device=logits.device, dtype=torch.long)
        # ids beyond the lm_head (a padded embedding vocab) can never be sampled, so they need no penalty
        ids = ids[ids < logits.shape[1]]
        seen = logits[i, ids]
        logits[i, ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-k, then top-p, then min-p on fp32 logits [N, V] with each row's params; see filter_rows."""
    vocab, dev = logits.shape[1], logits.device
    top_k = torch.tensor([min(p.top_k or vocab, vocab) for p in params], device=dev)
    top_p = torch.tensor([1.0 if p.top_p is None else p.top_p for p in params], device=dev)
    min_p = torch.tensor([p.min_p or 0.0 for p in params], device=dev)
    return filter_rows(logits, top_k, top_p, min_p)


def filter_rows(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p, then min-p on fp32 logits [N, V]; top_k [N] long in [1, V], top_p [N] (1: off), min_p [N]
    (0: off), on the logits' device. Removed entries become -inf (a new tensor).

    One ascending sort serves all three: the k-th largest is a column of it, top-p's cumulative mass is
    HF's (it sorts ascending too), and min-p compares probabilities, which a permutation does not change.
    Like HF, ties with the k-th value survive top-k and the most likely token always survives.
    """
    vocab = logits.shape[1]
    s, idx = logits.sort(dim=-1)
    kth = s.gather(1, (vocab - top_k).unsqueeze(1))
    s = s.masked_fill(s < kth, float("-inf"))

    cum = s.softmax(dim=-1).cumsum(dim=-1)
    drop = (cum <= (1 - top_p).unsqueeze(1)) & (top_p < 1).unsqueeze(1)  # top_p 1 is off, as HF skips the warper
    drop[:, -1] = False
    s = s.masked_fill(drop, float("-inf"))

    probs = s.softmax(dim=-1)
    s = s.masked_fill(probs < min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return torch.empty_like(s).scatter_(1, idx, s)


def _multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    if generator is not None and generator.device != probs.device:
        # Seeded rows draw on their generator's device (the engine keeps CPU ones), so a seed gives the
        # same tokens on CPU and GPU; a V-sized copy per seeded row is cheap next to the forward
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]] | None = None,
           generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """Next token per row. logits: [N, V] any float dtype; histories: prompt+generated ids per row (for the
    repetition penalty); generators: per-row RNG (seeded requests), None rows use torch's default RNG.
    Returns LongTensor [N] on logits' device. Greedy rows (temperature below GREEDY_BELOW) take the lowest-index
    argmax. A row whose logits are not all finite, or stop being so under its penalty or temperature, gets -1: the
    check stays on the device and reaches the host with the tokens (no extra sync)."""
    n = logits.shape[0]
    assert len(params) == n, f"{len(params)} SamplingParams for {n} logit rows"
    logits = logits.float()  # a new tensor for half dtypes; cloned below before any in-place change
    if histories is not None and any(_penalty(p) != 1.0 for p in params):
        logits = apply_repetition_penalty(logits.clone(), params, histories)
    ok = torch.isfinite(logits).all(dim=-1)
    greedy = [p.greedy for p in params]
    if all(greedy):
        return torch.where(ok, logits.argmax(dim=-1), -1)

    temps = torch.tensor([1.0 if p.greedy else _temperature(p) for p in params], device=logits.device)
    scaled = logits / temps.unsqueeze(1)
    ok &= torch.isfinite(scaled).all(dim=-1)
    # a bad row's probabilities would make multinomial raise (or assert on a GPU): it draws from uniform ones
    scaled = scaled.masked_fill(~ok.unsqueeze(1), 0.0)
    if any(_filters_anything(p) for p, g in zip(params, greedy) if not g):
        scaled = filter_logits(scaled, params)
    probs = scaled.softmax(dim=-1)

    out = logits.argmax(dim=-1)  # greedy rows keep this; sampled rows are overwritten below
    gens = generators or [None] * n
    shared = [i for i in range(n) if not greedy[i] and gens[i] is None]
    if shared:
        rows = torch.tensor(shared, device=logits.device)
        out[rows] = torch.multinomial(probs[rows], 1).squeeze(1)
    for i in range(n):
        if not greedy[i] and gens[i] is not None:
            out[i] = _multinomial(probs[i], gens[i])
    return torch.where(ok, out, -1)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                min_p: torch.Tensor, penalty: torch.Tensor, uniform: torch.Tensor, seen: torch.Tensor | None = None,
                greedy_only: bool = False, filters: bool = True) -> torch.Tensor:
    """The device half of Sampler: next token per row, LongTensor [N], -1 where a row's logits are not all finite.

    logits [N, V]; per row [N] on its device: temperature (0: greedy), top_k (in [1, V]), top_p, min_p, penalty (1:
    off) and uniform (fp64 in [0, 1): the draw); seen [N, V] bool: the tokens each row's penalty applies to (None:
    no row has one). greedy_only / filters: what the host knows of every row, so it skips the work."""
    x = logits.float()
    if seen is not None:
        pen = penalty[:, None]
        x = torch.where(seen, torch.where(x < 0, x * pen, x / pen), x)
    finite = torch.isfinite(x).all(-1)
    token = x.argmax(dim=-1)  # greedy: the lowest index among equal maxima
    if not greedy_only:
        greedy = temperature == 0
        scaled = x / torch.where(greedy, 1.0, temperature)[:, None]
        finite &= torch.isfinite(scaled).all(-1)  # a finite logit over a small temperature can overflow
        if filters:
            scaled = filter_rows(scaled, top_k, top_p, min_p)
        cdf = scaled.softmax(dim=-1).double().cumsum(dim=-1)
        # inverse CDF: the first token whose cumulative mass passes u * total; a removed token (probability 0) adds
        # no mass and is never the first
        drawn = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
        token = torch.where(greedy, token, drawn.clamp_max(x.shape[1] - 1))
    return torch.where(finite, token, -1)


class Sampler:
    """Samples the engine's rows on their device; keeps per-sequence state: the seeded rows' generators and, for
    sequences with a repetition penalty, a row of a device bitmap of the tokens they hold (prompt and output)."""

    def __init__(self, device: torch.device, max_seqs: int):
        self.device = device
        self.generators: dict[int, torch.Generator] = {}
        self.seen: torch.Tensor | None = None  # [max_seqs + 1, V] bool; the last row stays empty (unpenalized rows)
        self.max_seqs = max_seqs
        self.seen_rows: dict[int, tuple[int, int]] = {}  # seq_id -> (bitmap row, tokens of token_ids marked in it)
        self.free_rows = list(range(max_seqs))

    def add(self, seq: Sequence) -> None:
        if seq.params.seed is not None:
            self.generators[seq.seq_id] = torch.Generator().manual_seed(seq.params.seed)

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)
        row = self.seen_rows.pop(seq.seq_id, None)
        if row is not None:
            self.free_rows.append(row[0])

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """The next token of each sequence (logits [N, V], row i for seqs[i]); -1 for a row whose logits are not all
        finite."""
        params = [s.params for s in seqs]
        vocab = logits.shape[1]
        n = len(seqs)
        uniform = torch.rand(n, dtype=torch.float64)  # torch's global generator for unseeded rows
        for i, seq in enumerate(seqs):
            if seq.seq_id in self.generators:
                uniform[i] = torch.rand(1, dtype=torch.float64, generator=self.generators[seq.seq_id])
        host = torch.tensor([[0.0 if p.greedy else _temperature(p) for p in params],
                             [min(p.top_k or vocab, vocab) for p in params],
                             [1.0 if p.top_p is None else p.top_p for p in params], [p.min_p or 0.0 for p in params],
                             [_penalty(p) for p in params]], dtype=torch.float64)
        rows = self._upload(torch.cat((host, uniform[None])))
        penalized = [i for i, p in enumerate(params) if _penalty(p) != 1.0]
        seen = self._seen(seqs, penalized, vocab) if penalized else None
        greedy_only = all(p.greedy for p in params)
        filters = any(_filters_anything(p) for p in params if not p.greedy)
        tokens = sample_rows(logits, rows[0].float(), rows[1].long(), rows[2].float(), rows[3].float(),
                             rows[4].float(), rows[5], seen, greedy_only, filters)
        return tokens.tolist()  # the one download

    def _seen(self, seqs: list[Sequence], penalized: list[int], vocab: int) -> torch.Tensor:
        """[N, V] bool: each penalized row's tokens so far (marked incrementally), False rows for the others."""
        if self.seen is None:
            self.seen = torch.zeros(self.max_seqs + 1, vocab, dtype=torch.bool, device=self.device)
        index = [self.max_seqs] * len(seqs)
        mark_rows, mark_ids = [], []
        for i in penalized:
            seq = seqs[i]
            row, marked = self.seen_rows.get(seq.seq_id) or (self.free_rows.pop(), 0)
            if not marked:
                self.seen[row] = False  # a row freed by a finished sequence still holds its tokens
            new = [t for t in seq.token_ids[marked:] if 0 <= t < vocab]  # ids past the lm_head are never sampled
            mark_rows += [row] * len(new)
            mark_ids += new
            self.seen_rows[seq.seq_id] = (row, seq.num_tokens)
            index[i] = row
        if mark_ids:
            marks = self._upload(torch.tensor([mark_rows, mark_ids], dtype=torch.long))
            self.seen[marks[0], marks[1]] = True
        return self.seen[self._upload(torch.tensor(index))]

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        """t on the device without waiting for it: from pinned memory, which the copy keeps until it is done."""
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t
