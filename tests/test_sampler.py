"""Sampler semantics against transformers' logits processors, plus seeding and empirical frequencies."""

import pytest
import torch

from openclaw.config import SamplingParams
from openclaw.engine.sampler import filter_logits, sample
from openclaw.errors import OpenClawError

lp = pytest.importorskip("transformers.generation.logits_process")


def _logits(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_lowest_index_on_ties():
    logits = _logits(6, 1000)
    logits[2, [7, 500]] = 100.0  # a tie: the lower index wins
    params = [SamplingParams(temperature=0.0)] * 6
    out = sample(logits.to(torch.bfloat16), params)
    assert out.dtype == torch.long and out.shape == (6,)
    assert out.tolist() == logits.to(torch.bfloat16).float().argmax(-1).tolist() and out[2] == 7


def test_mixed_greedy_and_sampled_rows():
    logits = _logits(4, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=3)] * 2
    out = sample(logits, params)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    for i in (1, 3):
        assert out[i] in logits[i].topk(3).indices


def test_top_k_1_is_greedy_at_high_temperature():
    logits = _logits(8, 300)
    params = [SamplingParams(temperature=50.0, top_k=1, seed=i) for i in range(8)]
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    for _ in range(5):
        assert sample(logits, params, generators=gens).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize(("top_p", "support"), [(0.75, {0, 1}), (0.85, {0, 1, 2}), (0.4, {0}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_set_reaching_p(top_p, support):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(2000, 4).contiguous()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = sample(logits, [SamplingParams(temperature=1.0, top_p=top_p)] * 2000)
    assert set(out.tolist()) == support


def test_min_p_support():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    logits = probs.log().expand(2000, 5).contiguous()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = sample(logits, [SamplingParams(temperature=1.0, min_p=0.2)] * 2000)  # threshold 0.08
    assert set(out.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf(penalty):
    logits = _logits(3, 200, seed=1)
    histories = [[5, 5, 17, 199, 0], [], [3, 250, 42]]  # duplicates, empty, and an id past the lm_head
    params = [SamplingParams(temperature=0.0, repetition_penalty=penalty)] * 3
    proc = lp.RepetitionPenaltyLogitsProcessor(penalty)
    for i, hist in enumerate(histories):
        ref = proc(torch.tensor([hist], dtype=torch.long), logits[i:i + 1].clone()) if hist else logits[i:i + 1]
        assert sample(logits[i:i + 1], params[i:i + 1], [hist]) == ref.argmax(-1)
    # the penalty decides the greedy pick: punish the winner and the runner-up takes over
    row = logits[0].clone()
    row[9] = 10.0
    row[11] = 9.0
    assert sample(row[None], [SamplingParams(temperature=0.0, repetition_penalty=1.5)], [[9]]).item() == 11
    assert sample(row[None], [SamplingParams(temperature=0.0, repetition_penalty=1.0)], [[9]]).item() == 9


def test_repetition_penalty_logits_match_hf():
    from openclaw.engine.sampler import apply_repetition_penalty

    logits = _logits(2, 64, seed=3)
    histories = [[1, 2, 2, 63, 10, 70], [0, 5, 6]]  # 70: past the lm_head, ignored as HF does
    params = [SamplingParams(repetition_penalty=1.2), SamplingParams(repetition_penalty=0.8)]
    ours = apply_repetition_penalty(logits.clone(), params, histories)
    for i, (p, hist) in enumerate(zip(params, histories)):
        ref = lp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([hist]), logits[i:i + 1].clone())
        torch.testing.assert_close(ours[i], ref[0], rtol=0, atol=0)


def _hf_filter(scores: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    dummy = torch.zeros(1, 1, dtype=torch.long)
    if p.top_k:
        scores = lp.TopKLogitsWarper(p.top_k)(dummy, scores)
    if p.top_p is not None and p.top_p < 1:
        scores = lp.TopPLogitsWarper(p.top_p)(dummy, scores)
    if p.min_p:
        scores = lp.MinPLogitsWarper(p.min_p)(dummy, scores)
    return scores


FILTER_PARAMS = [
    SamplingParams(top_k=5), SamplingParams(top_k=1), SamplingParams(top_k=10_000),
    SamplingParams(top_p=0.9), SamplingParams(top_p=0.3), SamplingParams(min_p=0.05), SamplingParams(min_p=0.5),
    SamplingParams(top_k=40, top_p=0.8, min_p=0.02), SamplingParams(top_k=20, top_p=0.95),
    SamplingParams(top_p=0.7, min_p=0.1), SamplingParams(), SamplingParams(top_k=0, top_p=1.0, min_p=0.0),
    SamplingParams(top_p=1e-9),  # 1 - p rounds to 1.0 in fp32: only the keep-the-top-token rule saves a token
]


def test_filter_logits_matches_hf_warpers_per_row():
    # every row has different params, so the vectorised per-row thresholds are checked against HF row by row
    logits = _logits(len(FILTER_PARAMS), 997, seed=2) / 2
    ours = filter_logits(logits, FILTER_PARAMS)
    for i, p in enumerate(FILTER_PARAMS):
        ref = _hf_filter(logits[i:i + 1].clone(), p)[0]
        assert torch.equal(ours[i].isinf(), ref.isinf()), f"row {i}: {p}"
        torch.testing.assert_close(ours[i][~ref.isinf()], ref[~ref.isinf()], rtol=0, atol=0)
    assert ours[10].isinf().sum() == 0 and ours[1].isfinite().sum() == 1


def test_top_k_keeps_ties_like_hf():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 0.0]])
    ours = filter_logits(logits, [SamplingParams(top_k=3)])
    ref = lp.TopKLogitsWarper(3)(None, logits.clone())
    assert torch.equal(ours.isinf(), ref.isinf()) and ours.isfinite().sum() == 4


def test_disabled_top_p_keeps_zero_probability_tokens():
    # -200 underflows to probability 0; HF skips top-p at 1.0, so top-k alone decides what survives
    logits = torch.tensor([[0.0, -200.0, -300.0, 1.0, 2.0]])
    ours = filter_logits(logits, [SamplingParams(top_k=4, top_p=1.0)])
    assert torch.equal(ours.isinf(), lp.TopKLogitsWarper(4)(None, logits.clone()).isinf())
    assert ours.isinf().tolist() == [[False, False, True, False, False]]


def test_seed_reproducible_and_independent_of_batch():
    logits = _logits(5, 500, seed=4)
    params = [SamplingParams(temperature=1.2, top_p=0.95, seed=i) for i in range(5)]

    def draws(rows: list[int], steps: int = 20) -> list[list[int]]:
        gens = [torch.Generator().manual_seed(100 + r) for r in rows]
        return [sample(logits[rows], [params[r] for r in rows], generators=gens).tolist() for _ in range(steps)]

    full = draws([0, 1, 2, 3, 4])
    assert full == draws([0, 1, 2, 3, 4])
    alone = draws([3])
    assert [step[3] for step in full] == [step[0] for step in alone]
    # an unseeded neighbour that draws from the global RNG does not disturb the seeded row either
    gens = [torch.Generator().manual_seed(103), None]
    mixed = [sample(logits[[3, 0]], [params[3], SamplingParams(temperature=1.0)], generators=gens)[0].item()
             for _ in range(20)]
    assert mixed == [step[0] for step in alone]
    assert len({tuple(step) for step in full}) > 1  # it does sample


def test_frequencies_match_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20_000
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        out = sample(logits.expand(n, 6).contiguous(), [SamplingParams(temperature=1.0)] * n)
    counts = torch.bincount(out, minlength=6).double()
    expected = logits.double().softmax(-1) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom, p = 0.001

    # temperature reshapes the distribution as softmax(logits / T)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        out = sample(logits.expand(n, 6).contiguous(), [SamplingParams(temperature=0.5)] * n)
    counts = torch.bincount(out, minlength=6).double()
    expected = (logits.double() / 0.5).softmax(-1) * n
    mask = expected > 5  # the chi-square approximation needs enough expected counts per cell
    assert ((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum().item() < 20.5


def test_input_dtype_and_tensor_untouched():
    logits = _logits(2, 100).to(torch.float16)
    before = logits.clone()
    params = [SamplingParams(temperature=0.8, top_k=10, repetition_penalty=1.3)] * 2
    sample(logits, params, [[1, 2, 3], [4]])
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-6])
def test_temperatures_float32_cannot_hold_sample_greedily(temperature):
    """1e-300 passed validation and became 0 in float32: logits / 0 crashed the sampling step of the whole batch."""
    logits = _logits(4, 300)
    params = [SamplingParams(temperature=temperature, top_p=0.9, repetition_penalty=1.2),
              SamplingParams(temperature=1.0, seed=0)] * 2
    assert params[0].greedy
    gens = [None, torch.Generator().manual_seed(0)] * 2
    out = sample(logits, params, [[1, 2]] * 4, gens)
    penalized = logits.clone()
    penalized[:, [1, 2]] = torch.where(penalized[:, [1, 2]] < 0, penalized[:, [1, 2]] * 1.2, penalized[:, [1, 2]] / 1.2)
    assert out[0] == penalized[0].argmax() and out[2] == penalized[2].argmax()
    assert (out >= 0).all()


@pytest.mark.parametrize("penalty", [1e-300, 0.0, 1e300, float("nan")])
def test_repetition_penalties_float32_cannot_hold_are_refused(penalty):
    with pytest.raises(OpenClawError, match=r"repetition_penalty .* must be in \[0.0001, 10000\]"):
        SamplingParams(repetition_penalty=penalty)
    assert SamplingParams(repetition_penalty=1e-4).repetition_penalty == 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_row_with_non_finite_logits_gets_minus_one_and_the_others_sample(dtype):
    """Checked per row in every dtype (only float16 was, and for the whole batch): a NaN row became a greedy argmax
    in bfloat16, or made torch.multinomial raise for every row."""
    logits = _logits(6, 200).to(dtype)
    logits[1, 7] = float("nan")
    logits[3, 9] = float("inf")
    logits[4, 0] = float("-inf")
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, seed=3), SamplingParams(temperature=0.9)]
    gens = [None, None, None, None, torch.Generator().manual_seed(3), None]
    out = sample(logits, params, generators=gens)
    assert out.tolist()[1] == -1 and out.tolist()[3] == -1 and out.tolist()[4] == -1
    assert out[0] == logits[0].float().argmax() and 0 <= out[2] < 200 and 0 <= out[5] < 200
    greedy = sample(logits, [SamplingParams(temperature=0.0)] * 6)  # the all-greedy path checks too
    assert greedy.tolist()[1] == greedy.tolist()[3] == greedy.tolist()[4] == -1 and (greedy[[0, 2, 5]] >= 0).all()


def test_a_row_that_overflows_under_its_temperature_gets_minus_one():
    logits = torch.full((2, 10), 3e38)
    logits[:, 0] = 0.0
    out = sample(logits, [SamplingParams(temperature=0.5), SamplingParams(temperature=1.0)])
    assert out.tolist()[0] == -1 and out.tolist()[1] in range(1, 10)
