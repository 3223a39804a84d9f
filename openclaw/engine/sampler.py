"""Logits -> next tokens, one SamplingParams per row, in Hugging Face's order and with its semantics.

Repetition penalty, temperature, top-k, top-p, min-p, then torch.multinomial with the row's own generator. A row
whose logits are not finite gets token -1 instead, so one bad row never fails the batch. It does not fill defaults
(SamplingParams.with_defaults does) nor track history (the caller passes it).
"""

import torch

from openclaw.config import SamplingParams


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
    """Top-k, then top-p, then min-p on fp32 logits [N, V]; removed entries become -inf (a new tensor).

    One ascending sort serves all three: the k-th largest is a column of it, top-p's cumulative mass is
    HF's (it sorts ascending too), and min-p compares probabilities, which a permutation does not change.
    Like HF, ties with the k-th value survive top-k and the most likely token always survives.
    """
    vocab, dev = logits.shape[1], logits.device
    top_k = torch.tensor([min(p.top_k or vocab, vocab) for p in params], device=dev)
    top_p = torch.tensor([1.0 if p.top_p is None else p.top_p for p in params], device=dev)
    min_p = torch.tensor([p.min_p or 0.0 for p in params], device=dev)

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
