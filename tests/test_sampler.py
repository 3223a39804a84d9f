"""Sampler semantics against transformers' logits processors, plus seeding and empirical frequencies; the device
Sampler (what the engine runs) against the reference sample()."""

import pytest
import torch

from openclaw.config import SamplingParams
from openclaw.engine.sampler import Sampler, apply_repetition_penalty, filter_logits, sample
from openclaw.engine.sequence import Sequence
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


# The device sampler (what the engine runs) against the reference above

CHI2_999 = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26, 32.91]  # p = 0.001, df 1-12


def _seqs(params: list[SamplingParams], histories: list[list[int]]) -> list[Sequence]:
    return [Sequence(list(h), p, max_len=10_000) for p, h in zip(params, histories)]


def test_device_greedy_equals_reference_exactly():
    logits = _logits(7, 1000, seed=5)
    logits[2, [7, 500]] = 100.0  # a tie: the lower index wins
    logits[5, 9], logits[5, 11] = 50.0, 49.0  # the penalty on 9 hands the pick to 11
    histories = [[1, 2], [], [3], [9, 9, 400], [], [9], [999, 0]]
    params = [SamplingParams(temperature=0.0, repetition_penalty=r) for r in (1.0, 1.3, 1.0, 0.7, 1.0, 1.5, 2.0)]
    got = Sampler(torch.device("cpu"), 7).sample(logits.to(torch.bfloat16), _seqs(params, histories))
    assert got == sample(logits.to(torch.bfloat16), params, histories).tolist()
    assert got[2] == 7 and got[5] == 11


DRAWS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.8),
         SamplingParams(min_p=0.1, temperature=1.2), SamplingParams(repetition_penalty=1.6, temperature=1.0),
         SamplingParams(temperature=1.3, top_k=8, top_p=0.9, min_p=0.05)]


@pytest.mark.parametrize("p", DRAWS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_device_draws_match_reference_distribution(p):
    """Seeded rows (one seed per row) over fixed logits: the device sampler's and the reference's frequencies both fit
    the exact distribution (penalty, temperature and filters applied as HF does) and share its support."""
    n, vocab = 3000, 12
    logits = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.8, 0.5, 0.3, 0.0, -0.5, -1.0, -2.0, -4.0])[None].expand(n, vocab)
    history = [0, 3]  # tokens 0 and 3 were seen: the penalty applies to them
    params = [SamplingParams(**{**p.__dict__, "seed": i}) for i in range(n)]
    exact = apply_repetition_penalty(logits[:1].clone(), [p], [history]) / (p.temperature or 1.0)
    exact = filter_logits(exact, [p]).softmax(-1)[0].double()
    sampler, seqs = Sampler(torch.device("cpu"), n), _seqs(params, [history] * n)
    for s in seqs:
        sampler.add(s)  # each row draws on its own seeded generator: the draws are the same on every run
    ours = torch.tensor(sampler.sample(logits.contiguous(), seqs))
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    ref = sample(logits.contiguous(), params, [history] * n, gens)
    for draws in (ours, ref):
        counts = torch.bincount(draws, minlength=vocab).double()
        assert set(draws.tolist()) == set(exact.nonzero().flatten().tolist())
        expected = exact * n
        cells = expected > 5
        chi2 = ((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum().item()
        assert chi2 < CHI2_999[int(cells.sum()) - 2], f"chi-square {chi2:.1f} over {int(cells.sum())} cells"


def test_device_seeded_rows_reproduce_whatever_the_batch():
    logits = _logits(4, 300, seed=6)
    params = [SamplingParams(temperature=1.1, top_p=0.95, seed=10 + i) for i in range(4)]

    def draws(rows: list[int], steps: int = 15) -> list[list[int]]:
        sampler = Sampler(torch.device("cpu"), 4)
        seqs = _seqs([params[r] for r in rows], [[1]] * len(rows))
        for s in seqs:
            sampler.add(s)
        return [sampler.sample(logits[rows], seqs) for _ in range(steps)]

    full = draws([0, 1, 2, 3])
    assert full == draws([0, 1, 2, 3]) and len({tuple(step) for step in full}) > 1
    assert [step[2] for step in full] == [step[0] for step in draws([2])]


def test_device_rows_with_non_finite_logits_get_minus_one():
    logits = _logits(4, 50, seed=7)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.9, top_k=5, seed=1)]
    got = Sampler(torch.device("cpu"), 4).sample(logits, _seqs(params, [[1]] * 4))
    assert got[1] == got[2] == -1 and got[0] == logits[0].argmax() and got[3] in logits[3].topk(5).indices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_device_sampler_matches_reference():
    """On CUDA: greedy (with penalties) equal to the reference exactly, seeded draws distributed as the exact
    distribution, -1 for non-finite rows."""
    logits = _logits(6, 1000, seed=8)
    logits[4, 5] = float("nan")
    histories = [[1, 2], [3], [9, 9, 400], [], [1], [999]]
    params = [SamplingParams(temperature=0.0, repetition_penalty=r) for r in (1.0, 1.3, 0.7, 1.0, 1.0, 2.0)]
    got = Sampler(torch.device("cuda"), 6).sample(logits.cuda(), _seqs(params, histories))
    ref = sample(logits, params, histories).tolist()
    assert got[4] == -1 and [g for i, g in enumerate(got) if i != 4] == [r for i, r in enumerate(ref) if i != 4]
    n, p = 3000, DRAWS[-1]
    small = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.8, 0.5, 0.3, 0.0, -0.5, -1.0, -2.0, -4.0])[None].expand(n, 12)
    seeded = [SamplingParams(**{**p.__dict__, "seed": i}) for i in range(n)]
    draws = torch.tensor(Sampler(torch.device("cuda"), n).sample(small.contiguous().cuda(), _seqs(seeded, [[0]] * n)))
    exact = filter_logits(small[:1] / p.temperature, [p]).softmax(-1)[0].double() * n
    counts = torch.bincount(draws, minlength=12).double()
    cells = exact > 5
    assert set(draws.tolist()) == set(exact.nonzero().flatten().tolist())
    assert ((counts[cells] - exact[cells]) ** 2 / exact[cells]).sum() < CHI2_999[int(cells.sum()) - 2]


def test_device_penalty_rows_are_cleared_for_the_next_sequence():
    """A penalized sequence's bitmap row, freed when it finishes, starts empty for the next one."""
    logits = torch.zeros(1, 10)
    logits[0, 3], logits[0, 4] = 5.0, 4.0
    sampler = Sampler(torch.device("cpu"), 1)
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    first = Sequence([3, 3], p, max_len=100)
    assert sampler.sample(logits, [first]) == [4]  # 3 was seen: 5 / 2 < 4
    sampler.release(first)
    assert sampler.sample(logits, [Sequence([7], p, max_len=100)]) == [3]
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
    seqs = _seqs(params, [[1, 2]] * 4)  # the device sampler the engine runs: the same greedy rows
    got = Sampler(torch.device("cpu"), 4).sample(logits, seqs)
    assert got[0] == out[0] and got[2] == out[2] and min(got) >= 0


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
