"""kernels/decode_ops.py and kernels/decode_attention.py against their fp32 references (Triton's interpreter on the
CPU, the real kernels on CUDA) on tiny, odd and real Qwen3-32B / SmolLM2 shapes; and the tiny Qwen3 / Llama models
with every op forced onto its Triton kernel, against the same models on the references, through full forwards and
incremental decode in the pool (GLM-4-0414 too: its partial rotary runs the same fused kernel)."""

from contextlib import contextmanager

import openclaw.models.glm4
import openclaw.models.layers
import openclaw.models.qwen3
import pytest
import torch
from conftest import assert_close
from openclaw.kernels.decode_attention import decode_attention_ref, decode_attention_triton
from openclaw.kernels.decode_ops import (
    add_rmsnorm_ref,
    add_rmsnorm_triton,
    qk_norm_rope_kv_ref,
    qk_norm_rope_kv_triton,
    silu_mul_ref,
    silu_mul_triton,
)
from openclaw.models.layers import BatchMeta, Rope
from tiny_models import make_hf_model

from openclaw.engine.kv_pool import KVPool
from openclaw.weights.loader import load_model

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
# (hidden, H, Hkv, D, intermediate)
QWEN3_32B = (5120, 64, 8, 128, 25600)
SMOLLM2 = (576, 9, 3, 64, 1536)


def close(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, elementwise: bool = True) -> None:
    """assert_close at dtype's tolerance; elementwise=False: by relative RMS (RoPE outputs, where an ulp of a large
    input lands on a near-zero output). bf16 through Triton's interpreter gets 3 ulps (2.5e-2; RMS 1.5e-2): the
    interpreter truncates fp32 -> bf16 casts where the GPU rounds to nearest even, so each of the up to three
    rounding points may be an ulp further off (fp16 rounds correctly there and checks the rounding order)."""
    if dtype != torch.bfloat16 or actual.is_cuda:
        return assert_close(actual, ref, dtype, matmul=not elementwise)
    actual, ref = actual.float().cpu(), ref.float().cpu()
    assert not actual.isnan().any(), "NaN in the output (an unwritten lane?)"
    if elementwise:
        torch.testing.assert_close(actual, ref, rtol=2.5e-2, atol=2.5e-2)
    else:
        assert (actual - ref).norm() <= 1.5e-2 * ref.norm()


def randn(*shape, dtype=torch.float32, seed=0, device=DEV) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def nan(*shape, dtype=torch.float32, device=DEV) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def check_add_rmsnorm(T: int, N: int, dtype: torch.dtype, residual: bool, device: str = DEV) -> None:
    x, w = randn(T, N, dtype=dtype, seed=1, device=device), 1 + 0.1 * randn(N, dtype=dtype, seed=2, device=device)
    r = randn(T, N, dtype=dtype, seed=3, device=device) if residual else None
    y, r_out = nan(T, N, dtype=dtype, device=device), nan(T, N, dtype=dtype, device=device)
    got = add_rmsnorm_triton(x, r, w, 1e-6, out=y, residual_out=r_out)
    ref = add_rmsnorm_ref(x, r, w, 1e-6)
    assert got[0] is y and (got[1] is r_out if residual else got[1] is x)
    close(got[0], ref[0], dtype)
    close(got[1], ref[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N", [(1, 16), (5, 123), (3, QWEN3_32B[0]), (3, SMOLLM2[0])])
def test_add_rmsnorm(T, N, dtype):
    check_add_rmsnorm(T, N, dtype, residual=True)
    check_add_rmsnorm(T, N, dtype, residual=False)


def check_silu_mul(T: int, inter: int, dtype: torch.dtype, device: str = DEV) -> None:
    x = 3 * randn(T, 2 * inter, dtype=dtype, seed=4, device=device)
    out = nan(T, inter, dtype=dtype, device=device)
    assert silu_mul_triton(x, out=out) is out
    close(out, silu_mul_ref(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,inter", [(1, 8), (5, 123), (2, QWEN3_32B[4]), (3, SMOLLM2[4])])
def test_silu_mul(T, inter, dtype):
    check_silu_mul(T, inter, dtype)


def check_qk_norm_rope_kv(T: int, H: int, Hkv: int, D: int, dtype: torch.dtype, qk_norm: bool,
                          device: str = DEV, padded: bool = False) -> None:
    """Tokens at scattered slots of a NaN pool: written slots match the reference, every other slot stays NaN.
    padded: every other token has slot -1 (a padded row of a captured batch): its q is computed, its K/V go nowhere."""
    S = 2 * T + 3
    qkv = randn(T, (H + 2 * Hkv) * D, dtype=dtype, seed=5, device=device)
    qw = 1 + 0.1 * randn(D, dtype=dtype, seed=6, device=device) if qk_norm else None
    kw = 1 + 0.1 * randn(D, dtype=dtype, seed=7, device=device) if qk_norm else None
    rope = Rope(D, {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                4096)  # yarn: cos / sin carry a scale != 1
    cos, sin = rope.cos_sin(torch.arange(100, 100 + 7 * T, 7, device=device), dtype)
    slots = torch.randperm(S, generator=torch.Generator().manual_seed(T))[:T].to(device)
    if padded:
        slots[::2] = -1
    k, v, k_ref, v_ref = (nan(S, Hkv, D, dtype=dtype, device=device) for _ in range(4))
    q = nan(T, H, D, dtype=dtype, device=device)
    qk_norm_rope_kv_triton(qkv, qw, kw, 1e-6, cos, sin, k, v, slots, H, Hkv, D, out=q)
    q_ref = qk_norm_rope_kv_ref(qkv, qw, kw, 1e-6, cos, sin, k_ref, v_ref, slots, H, Hkv, D)
    close(q, q_ref, dtype, elementwise=dtype == torch.float32)
    written = slots[slots >= 0]
    close(k[written], k_ref[written], dtype, elementwise=dtype == torch.float32)
    close(v[written], v_ref[written], dtype)
    untouched = torch.ones(S, dtype=torch.bool, device=device)
    untouched[written] = False
    assert k_ref[untouched].isnan().all() and v_ref[untouched].isnan().all(), "the reference wrote outside its slots"
    assert k[untouched].isnan().all() and v[untouched].isnan().all(), "a slot outside slot_mapping was written"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qwen3", "llama"])
@pytest.mark.parametrize("T,H,Hkv,D", [(1, 2, 1, 16), (5, 6, 2, 24), (2, *QWEN3_32B[1:4]), (3, *SMOLLM2[1:4])])
def test_qk_norm_rope_kv(T, H, Hkv, D, dtype, qk_norm):
    check_qk_norm_rope_kv(T, H, Hkv, D, dtype, qk_norm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,Hkv,D", [(1, 2, 1, 16), (5, 6, 2, 24), (3, *QWEN3_32B[1:4])])
def test_qk_norm_rope_kv_padded_rows_write_nowhere(T, H, Hkv, D, dtype):
    check_qk_norm_rope_kv(T, H, Hkv, D, dtype, qk_norm=True, padded=True)


def check_decode_attention(H: int, Hkv: int, D: int, lens: list[int], bound: int, dtype: torch.dtype,
                           num_parts: int | None = None, device: str = DEV) -> None:
    """Sequences at different slot bases of a pool whose slots outside [base, base + len) are NaN: reading past a
    length (the graph case: bound > len) or into a neighbour poisons the output."""
    B = len(lens)
    bases = [3 + b * (bound + 5) for b in range(B)]
    S = bases[-1] + bound + 4
    k, v = nan(S, Hkv, D, dtype=dtype, device=device), nan(S, Hkv, D, dtype=dtype, device=device)
    for b, (base, n) in enumerate(zip(bases, lens)):
        k[base:base + n] = randn(n, Hkv, D, dtype=dtype, seed=10 + b, device=device)
        v[base:base + n] = randn(n, Hkv, D, dtype=dtype, seed=20 + b, device=device)
    q = randn(B, H, D, dtype=dtype, seed=8, device=device)
    base_t = torch.tensor(bases, device=device)
    len_t = torch.tensor(lens, device=device)
    out = nan(B, H, D, dtype=dtype, device=device)
    decode_attention_triton(q, k, v, base_t, len_t, D ** -0.5, bound, num_parts=num_parts, out=out)
    assert_close(out, decode_attention_ref(q, k, v, base_t, len_t, D ** -0.5), dtype, matmul=True)
    # the realized-attention output: each key's probability, summed over its query group, added at its slot
    before = torch.rand(S, Hkv, generator=torch.Generator().manual_seed(1)).to(device)
    mass, want = before.clone(), before.clone()
    out2 = nan(B, H, D, dtype=dtype, device=device)
    decode_attention_triton(q, k, v, base_t, len_t, D ** -0.5, bound, num_parts=num_parts, out=out2, mass=mass)
    assert torch.equal(out2, out), "asking for the mass must not change the attention output"
    G = H // Hkv
    for b, (base, n) in enumerate(zip(bases, lens)):
        logits = q[b].float().view(Hkv, G, D) @ k[base:base + n].float().permute(1, 2, 0) * D ** -0.5  # [Hkv, G, n]
        want[base:base + n] += torch.softmax(logits, dim=-1).sum(1).T
    torch.testing.assert_close(mass, want, rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-5)
    ref = before.clone()
    decode_attention_ref(q, k, v, base_t, len_t, D ** -0.5, mass=ref)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-6)
    # a captured batch's padded rows (slot -1) add no mass: only the rows with a real slot count
    slots = torch.tensor([-1 if b % 2 else base + n for b, (base, n) in enumerate(zip(bases, lens))], device=device)
    want = before.clone()
    for b, (base, n) in enumerate(zip(bases, lens)):
        if b % 2 == 0:
            logits = q[b].float().view(Hkv, G, D) @ k[base:base + n].float().permute(1, 2, 0) * D ** -0.5
            want[base:base + n] += torch.softmax(logits, dim=-1).sum(1).T
    for fn in (decode_attention_triton, decode_attention_ref):
        got = before.clone()
        extra = {"max_len": bound, "num_parts": num_parts} if fn is decode_attention_triton else {}
        fn(q, k, v, base_t, len_t, D ** -0.5, mass=got, slots=slots, **extra)
        torch.testing.assert_close(got, want, rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-5)



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D,lens,bound,parts", [
    (2, 1, 16, [1], 1, None),  # one key
    (4, 2, 16, [70, 3], 200, 3),  # bound far above the lengths: two of three partitions are empty
    (6, 2, 24, [1, 130, 65], 130, None),  # odd: G = 3, D = 24 (the tiny Qwen3)
    (*QWEN3_32B[1:4], [300, 17], 512, 4),  # G = 8
    (*SMOLLM2[1:4], [129, 256, 5], 300, None),  # G = 3
])
def test_decode_attention(H, Hkv, D, lens, bound, parts, dtype):
    check_decode_attention(H, Hkv, D, lens, bound, dtype, parts)


def test_decode_attention_lengths_are_read_at_run_time():
    """One launch configuration (bound, partitions), several true lengths: what a replayed CUDA graph sees. Lengths
    far under the bound still split over every partition (runs of 16 keys at least), or leave some empty."""
    for n in (1, 15, 17, 63, 64, 65, 190):
        check_decode_attention(4, 2, 16, [n], 192, torch.float32, num_parts=3)
    check_decode_attention(4, 2, 16, [100, 7, 40], 300, torch.float32, num_parts=5)


@contextmanager
def ops(fused: bool):
    """The models' kernel ops forced onto their Triton kernels (fused; Triton's interpreter on CPU tensors) or their
    references, whatever the device."""
    forced = {openclaw.models.layers: {"add_rmsnorm": (add_rmsnorm_triton, add_rmsnorm_ref),
                                       "decode_attention": (decode_attention_triton, _decode_attention_ref),
                                       "silu_mul": (silu_mul_triton, silu_mul_ref)},
              openclaw.models.qwen3: {"qk_norm_rope_kv": (qk_norm_rope_kv_triton, qk_norm_rope_kv_ref)},
              openclaw.models.glm4: {"qk_norm_rope_kv": (qk_norm_rope_kv_triton, qk_norm_rope_kv_ref)}}
    with pytest.MonkeyPatch.context() as mp:
        for module, names in forced.items():
            for name, (kernel, ref) in names.items():
                mp.setattr(module, name, kernel if fused else ref)
        yield


def _decode_attention_ref(q, k_cache, v_cache, slot_base, kv_len, scale, max_len, out=None, mass=None):
    y = decode_attention_ref(q, k_cache, v_cache, slot_base, kv_len, scale, mass=mass)
    return y if out is None else out.copy_(y)


class Forced:
    """A model whose forward runs under ops(fused)."""

    def __init__(self, model, fused: bool):
        self.model, self.fused, self.config = model, fused, model.config

    def __call__(self, *args):
        with ops(self.fused):
            return self.model(*args)


def load(path, dtype: torch.dtype, fused: bool) -> Forced:
    return Forced(load_model(path, torch.device(DEV), dtype), fused)


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, device=DEV)


def through_pool(model, ids: list[int], chunks: list[int] | None = None, bucket: int | None = None) -> torch.Tensor:
    """Logits [len(ids), V]: the chunks (default: one) in turn at slots [11, ...) of a larger pool, with the
    device-side slot ranges the runner sets (kv_valid, slot_base); bucket: one-token steps declare seqs' kv_len =
    bucket and the true length only in kv_valid, as a captured graph does."""
    cfg = model.config
    dtype = model.model.model.embed_tokens.weight.dtype
    pool = KVPool(cfg.num_hidden_layers, 400, cfg.num_key_value_heads, cfg.head_dim, dtype, DEV)
    base, done, got = 11, 0, []
    with torch.inference_mode():
        for T in chunks or [len(ids)]:
            kv = done + T
            meta = BatchMeta(slot_mapping=tensor(range(base + done, base + kv)), sample_idx=tensor(range(T)),
                             seqs=[(0, T, base, bucket if bucket and T == 1 else kv)],
                             kv_valid=tensor([kv]), slot_base=tensor([base]))
            got.append(model(tensor(ids[done:kv]), tensor(range(done, kv)), meta, pool.k, pool.v).float().cpu())
            done = kv
    return torch.cat(got)


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("kind", ["qwen3", "llama", "glm4"])
def test_fused_model_matches_plain_path(kind, tmp_path):
    """fp32: the fused path equals the plain one to 1e-5. bf16 / fp16: its logits are no further from the fp32 model
    than twice the plain path's at that dtype (random tiny models amplify rounding: plain bf16 is ~1% off)."""
    make_hf_model(kind, tmp_path)
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    chunks = [13, 9] + [1] * 8
    ref = through_pool(load(tmp_path, torch.float32, False), ids)
    for dtype in DTYPES:
        fused = load(tmp_path, dtype, True)
        tol = 1e-5 if dtype == torch.float32 else 2 * relative_error(through_pool(load(tmp_path, dtype, False), ids), ref)
        runs = [through_pool(fused, ids), through_pool(fused, ids, chunks)]
        if dtype == torch.float32:
            runs.append(through_pool(fused, ids, chunks, bucket=64))
        for got in runs:
            assert not got.isnan().any()
            assert relative_error(got, ref) <= tol, f"{dtype}: {relative_error(got, ref):.2e} > {tol:.2e}"


def test_fused_batched_decode_matches_each_alone(tmp_path):
    """Three sequences decoding in one step (one attention launch), then a mixed step (one prefills)."""
    make_hf_model("qwen3", tmp_path)
    model, plain = load(tmp_path, torch.float32, True), load(tmp_path, torch.float32, False)
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 30, 12)]
    pool = KVPool(cfg.num_hidden_layers, 200, cfg.num_key_value_heads, cfg.head_dim, torch.float32, DEV)
    bases = [0, 50, 120]
    with torch.inference_mode():
        for p, base in zip(prompts, bases):  # prefill all but the last token of each
            n = len(p) - 1
            meta = BatchMeta(slot_mapping=tensor(range(base, base + n)), seqs=[(0, n, base, n)],
                             sample_idx=tensor([]).long())
            model(tensor(p[:-1]), tensor(range(n)), meta, pool.k, pool.v)
        lens = [len(p) for p in prompts]
        meta = BatchMeta(slot_mapping=tensor([b + n - 1 for b, n in zip(bases, lens)]),
                         seqs=[(i, 1, b, n) for i, (b, n) in enumerate(zip(bases, lens))], sample_idx=tensor(range(3)),
                         kv_valid=tensor(lens), slot_base=tensor(bases))
        got = model(tensor([p[-1] for p in prompts]), tensor(lens) - 1, meta, pool.k, pool.v)
    assert_close(got, torch.stack([through_pool(plain, p)[-1] for p in prompts]), torch.float32, matmul=True)
    extra = torch.randint(0, 128, (6,), generator=g).tolist()
    with torch.inference_mode():  # sequence 0 decodes one more token while sequence 1 prefills 6
        meta = BatchMeta(slot_mapping=tensor([5, *range(80, 86)]), sample_idx=tensor([0, 6]),
                         seqs=[(0, 1, 0, 6), (1, 6, 50, 36)], kv_valid=tensor([6, 36]), slot_base=tensor([0, 50]))
        got = model(tensor([3, *extra]), tensor([5, *range(30, 36)]), meta, pool.k, pool.v)
    ref = torch.stack([through_pool(plain, prompts[0] + [3])[-1], through_pool(plain, prompts[1] + extra)[-1]])
    assert_close(got, ref, torch.float32, matmul=True)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [QWEN3_32B, SMOLLM2], ids=["qwen3-32b", "smollm2"])
def test_gpu_real_shapes(shape):
    hidden, H, Hkv, D, inter = shape
    for dtype in (torch.bfloat16, torch.float32):
        for T in (1, 7, 300):
            check_add_rmsnorm(T, hidden, dtype, residual=True, device="cuda")
            check_silu_mul(T, inter, dtype, device="cuda")
            check_qk_norm_rope_kv(T, H, Hkv, D, dtype, qk_norm=True, device="cuda")
        check_qk_norm_rope_kv(4, H, Hkv, D, dtype, qk_norm=False, device="cuda")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [QWEN3_32B, SMOLLM2], ids=["qwen3-32b", "smollm2"])
def test_gpu_decode_attention_long_context(shape):
    _, H, Hkv, D, _ = shape
    for dtype in (torch.bfloat16, torch.float32):
        check_decode_attention(H, Hkv, D, [32768], 32768, dtype, device="cuda")
        check_decode_attention(H, Hkv, D, [20000, 4096, 1, 777], 32768, dtype, device="cuda")
        check_decode_attention(H, Hkv, D, [5000], 8192, dtype, device="cuda")


@gpu
@pytest.mark.gpu
def test_gpu_decode_attention_replays_in_a_cuda_graph():
    """Captured once at a 16K bound, replayed at lengths written to the device tensor between replays."""
    H, Hkv, D = QWEN3_32B[1:4]
    bound, dtype = 16384, torch.bfloat16
    k, v = randn(bound + 10, Hkv, D, dtype=dtype, seed=1), randn(bound + 10, Hkv, D, dtype=dtype, seed=2)
    q = randn(1, H, D, dtype=dtype, seed=3)
    base, n = torch.tensor([10], device="cuda"), torch.tensor([bound], device="cuda")
    decode_attention_triton(q, k, v, base, n, D ** -0.5, bound)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(q, k, v, base, n, D ** -0.5, bound)
    for length in (1, 100, 5000, 8193, bound):
        n.fill_(length)
        graph.replay()
        assert_close(out, decode_attention_ref(q, k, v, base, n, D ** -0.5), dtype, matmul=True)
