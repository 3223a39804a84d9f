"""GGUF blocks -> QuantWeight: each repacked type dequantizes to what gguf.quants.dequantize gives (the symmetric ones
with a zero code and no offsets), tiny llama / qwen3 GGUF files (mixed types, llama's permuted Q/K) load quantized
with the greedy output of their dequantized import, fused parts of different types kept apart, planned bytes equal
allocated ones (also for Qwen3-32B Q4_K_M, by hand), and corrupt files are refused."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from openclaw.kernels.qlinear import QuantWeight
from openclaw.models import FAMILIES
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import full_forward

from openclaw.engine.memory import GIB, GRAPH_OVERHEAD, loaded_bytes, plan_model
from openclaw.errors import OpenClawError
from openclaw.weights.formats import iter_quantized
from openclaw.weights.gguf_blocks import REPACKED, gguf_to_quant, iter_gguf
from openclaw.weights.gguf_import import import_gguf
from openclaw.weights.layout import Layout
from openclaw.weights.loader import _internal_tensors, load_model, save_quantized
from openclaw.weights.sizes import checkpoint_weight_bytes, quantized_weight_bytes

Q = gguf.GGMLQuantizationType
H, HEADS, KV, D, INTER, LAYERS = 256, 4, 2, 64, 512, 2  # K-quant rows need K a multiple of 256
# every repacked type, and fused q/k/v and gate/up parts of different types (the loader keeps them apart)
TYPES = {"token_embd": Q.Q4_K, "output": Q.Q6_K, "attn_q": Q.Q4_K, "attn_k": Q.Q4_0, "attn_v": Q.Q6_K,
         "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_1, "ffn_up": Q.Q5_0, "ffn_down": Q.Q6_K}
HF_NAMES = {"embed_tokens": "token_embd", "lm_head": "output", "q_proj": "attn_q", "k_proj": "attn_k",
            "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
            "down_proj": "ffn_down"}


def blocks(qtype: gguf.GGMLQuantizationType, n: int, k: int, rng: np.random.Generator,
           exact: bool = True) -> np.ndarray:
    """Raw blocks uint8 [n, k / block * bytes] of plausible weights (|w| <~ 0.3): the gguf package's own
    quantizer where it has one; else random codes and scales, with d (and dmin) powers of two when `exact`, so
    that the sub-block products d * sc fit float16."""
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0):
        return gguf.quants.quantize((rng.standard_normal((n, k)) * 0.1).astype(np.float32), qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
    e = rng.integers(-16, -13, (len(raw), 1)) if qtype == Q.Q6_K else rng.integers(-12, -9, (len(raw), 1))
    d = 2.0**e if exact else 2.0**e * rng.uniform(1, 2, e.shape)
    d16 = d.astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # w = d * sc * q - dmin * m, sc, m, q >= 0: dmin = 8 d centres it
        raw[:, 0:2], raw[:, 2:4] = d16, (8 * d).astype(np.float16).view(np.uint8)
    else:
        raw[:, 208:210] = d16
    return raw.reshape(n, -1)


# the symmetric types, w = d * (q - z), by ggml's definitions: z is their zero code, and they need no offsets
ZEROS = {Q.Q4_0: 8, Q.Q5_0: 16, Q.Q6_K: 32, Q.Q8_0: 128}


@pytest.mark.parametrize("qtype", list(REPACKED))
def test_repack_dequantizes_exactly_like_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    n, k = 5, 512
    raw = blocks(qtype, n, k, rng)
    qw = gguf_to_quant("w", raw, qtype, (n, k))
    assert Layout(*qw.layout) == REPACKED[qtype] and qw.shape == (n, k)
    assert (qw.offsets is None, qw.zero) == ((True, ZEROS[qtype]) if qtype in ZEROS else (False, 0))
    assert torch.equal(qw.dequantize(), torch.from_numpy(gguf.quants.dequantize(raw, qtype)))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_k_quant_sub_block_scales_are_rounded_once(qtype):
    """With arbitrary d the products d * sc and dmin * m need more than float16's 11 bits: each is rounded once,
    so every weight is within 2^-11 of |(code - zero) * scale| + |offset| of gguf's value."""
    raw = blocks(qtype, 6, 512, np.random.default_rng(1), exact=False)
    qw = gguf_to_quant("w", raw, qtype, (6, 512))
    err = (qw.dequantize() - torch.from_numpy(gguf.quants.dequantize(raw, qtype))).abs()
    offsets = torch.zeros_like(qw.scales) if qw.offsets is None else qw.offsets
    scales, offsets = (t.float().repeat_interleave(qw.group, 1) for t in (qw.scales, offsets))
    bound = 2**-11 * (((qw.codes().float() - qw.zero) * scales).abs() + offsets.abs())
    assert 0 < err.max() and bool((err <= bound).all())


def test_q4_0_block_by_hand():
    """ggml's Q4_0 block: fp16 d, then 16 bytes; element j is the low nibble of byte j, element j + 16 its high
    nibble; w = d * (q - 8)."""
    qs = np.array([(15 - j) << 4 | j for j in range(16)], np.uint8)
    raw = np.concatenate([np.array([0.5], np.float16).view(np.uint8), qs])[None]
    qw = gguf_to_quant("w", raw, Q.Q4_0, (1, 32))
    assert qw.codes()[0].tolist() == list(range(16)) + list(range(15, -1, -1))
    assert (qw.scales.item(), qw.offsets, qw.zero) == (0.5, None, 8)
    assert qw.dequantize()[0, :3].tolist() == [-4.0, -3.5, -3.0]


def greedy(model, prompt: list[int], steps: int = 12) -> tuple[list[int], torch.Tensor]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(full_forward(model, ids)[-1].argmax()))
    return ids[len(prompt):], full_forward(model, ids)


def bytes_to_unicode() -> list[str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(path: Path, arch: str, types: dict = TYPES) -> None:
    """A 2-layer llama / qwen3 GGUF whose weights are all quantized (`types`) and whose norms are float32."""
    tokens = [*bytes_to_unicode(), "<|im_start|>", "<|im_end|>"]
    w = gguf.GGUFWriter(path, arch)
    for key, value in [("block_count", LAYERS), ("context_length", 256), ("embedding_length", H),
                       ("feed_forward_length", INTER), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", KV), ("attention.key_length", D), ("rope.dimension_count", D)]:
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 1e6)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3, 3])
    w.add_eos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), H), "output.weight": (len(tokens), H), "output_norm.weight": (H,)}
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.attn_norm.weight": (H,), f"blk.{i}.ffn_norm.weight": (H,),
                   f"blk.{i}.attn_q.weight": (HEADS * D, H), f"blk.{i}.attn_k.weight": (KV * D, H),
                   f"blk.{i}.attn_v.weight": (KV * D, H), f"blk.{i}.attn_output.weight": (H, HEADS * D),
                   f"blk.{i}.ffn_gate.weight": (INTER, H), f"blk.{i}.ffn_up.weight": (INTER, H),
                   f"blk.{i}.ffn_down.weight": (H, INTER)}
        if arch == "qwen3":
            shapes |= {f"blk.{i}.attn_q_norm.weight": (D,), f"blk.{i}.attn_k_norm.weight": (D,)}
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
        else:
            qtype = types[name.split(".")[-2]]
            w.add_tensor(name, blocks(qtype, *shape, rng), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_tiny_gguf_model_loads_quantized_with_its_dequantized_greedy_output(tmp_path, arch):
    """The reference is the existing importer (gguf.quants.dequantize to float32, Q/K un-permuted for llama)."""
    write_tiny_gguf(tmp_path / "tiny.gguf", arch)
    ref_dir = import_gguf(tmp_path / "tiny.gguf", tmp_path / "cache")
    q_dir = import_gguf(tmp_path / "tiny.gguf", tmp_path / "cache", quantized=True)
    assert q_dir != ref_dir and (q_dir / "model.gguf").is_symlink() and not list(q_dir.glob("*.safetensors"))
    assert import_gguf(tmp_path / "tiny.gguf", tmp_path / "cache", quantized=True) == q_dir  # cached
    raw = json.loads((q_dir / "config.json").read_text())
    assert raw["quantization_config"]["quant_method"] == "gguf"
    with safe_open(str(ref_dir / "model.safetensors"), "pt") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    got = dict(iter_quantized(q_dir, raw))
    assert got.keys() == ref.keys()
    for name, t in got.items():
        if isinstance(t, torch.Tensor):
            assert t.dim() == 1 and torch.equal(t, ref[name]), name
        else:
            assert Layout(*t.layout) == REPACKED[TYPES[HF_NAMES[name.split(".")[-2]]]], name
            assert torch.equal(t.dequantize(), ref[name]), name
    ours = load_model(q_dir, torch.device("cpu"), torch.float32)
    reference = load_model(ref_dir, torch.device("cpu"), torch.float32)
    assert ours.quantized and not reference.quantized
    for module, parts in [("self_attn.qkv_proj", ("attn_q", "attn_k", "attn_v")), ("mlp.gate_up_proj", ("ffn_gate",
                                                                                                      "ffn_up"))]:
        layouts = [Layout(*p.layout) for p in ours.get_submodule(f"model.layers.1.{module}").parts]
        assert layouts == [REPACKED[TYPES[t]] for t in parts], module  # kept apart: no part widened
    prompt = [3, 17, 99, 5, 60, 2, 41, 7]
    tokens, logits = greedy(ours, prompt)
    ref_tokens, ref_logits = greedy(reference, prompt)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_corrupt_or_missing_gguf_is_refused(tmp_path):
    with pytest.raises(OpenClawError, match=r"GGUF tensor blk\.0\.attn_q\.weight \(Q4_K.* the file is corrupt"):
        gguf_to_quant("blk.0.attn_q.weight", np.zeros((4, 100), np.uint8), Q.Q4_K, (4, 256))
    write_tiny_gguf(tmp_path / "tiny.gguf", "qwen3")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((tmp_path / "tiny.gguf").read_bytes()[:200_000])
    with pytest.raises(OpenClawError, match="not a readable GGUF file"):
        list(iter_gguf(cut))
    q_dir = import_gguf(tmp_path / "tiny.gguf", tmp_path / "cache", quantized=True)
    (tmp_path / "tiny.gguf").unlink()
    with pytest.raises(OpenClawError, match="does not exist"):
        load_model(q_dir, torch.device("cpu"), torch.float32)


@pytest.mark.slow
def test_smollm2_loads_quantized_like_its_float32_import(smollm2_gguf, smol_model_dir, tmp_path):
    """The real file (Q4_1 linears, Q8_0 tied embedding, llama's permuted Q/K): every repack is exact, so the
    quantized model and the float32 import give the same logits (and so the same argmax) at every position."""
    q_dir = import_gguf(smollm2_gguf, tmp_path / "cache", quantized=True)
    ours = load_model(q_dir, torch.device("cpu"), torch.float32)
    reference = load_model(smol_model_dir, torch.device("cpu"), torch.float32)
    assert ours.model.embed_tokens.qweight.bits == 8 and ours.model.layers[0].mlp.down_proj.qweight.group == 32
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 28, 3735, 8, 905, 5356, 314]
    logits, ref_logits = full_forward(ours, ids), full_forward(reference, ids)
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_planned_bytes_of_a_mixed_type_gguf_equal_what_the_loader_allocates(tmp_path, arch):
    """From the header alone: Q4_K/Q4_0/Q6_K q/k/v and Q4_1/Q5_0 gate/up kept apart as the loader keeps them."""
    write_tiny_gguf(tmp_path / "tiny.gguf", arch)
    q_dir = import_gguf(tmp_path / "tiny.gguf", tmp_path / "cache", quantized=True)
    model = load_model(q_dir, torch.device("cpu"), torch.bfloat16)
    assert checkpoint_weight_bytes(q_dir, 2) == loaded_bytes(model)


Q4K, Q6K = Layout(4, 32, True, False), Layout(8, 16, False, False, 32)  # what REPACKED makes of Q4_K and Q6_K
# a Q4_K_M file in miniature: Q4_K everywhere but Q6_K attn_v, ffn_down and output
Q4_K_M = {**{t: Q.Q4_K for t in TYPES}, "attn_v": Q.Q6_K, "ffn_down": Q.Q6_K, "output": Q.Q6_K}


def test_q4_k_m_gguf_keeps_its_mixed_qkv_in_parts(tmp_path):
    """Q4_K q/k and a Q6_K v stay three weights of one QuantLinear (none widened), Q4_K gate/up stack into one; the
    greedy output is the dequantized import's, and the planned bytes are what the loader allocates, by hand too."""
    write_tiny_gguf(tmp_path / "m.gguf", "qwen3", Q4_K_M)
    ref_dir = import_gguf(tmp_path / "m.gguf", tmp_path / "cache")
    q_dir = import_gguf(tmp_path / "m.gguf", tmp_path / "cache", quantized=True)
    ours = load_model(q_dir, torch.device("cpu"), torch.float32)
    for layer in ours.model.layers:
        assert [Layout(*p.layout) for p in layer.self_attn.qkv_proj.parts] == [Q4K, Q4K, Q6K]
        assert isinstance(layer.mlp.gate_up_proj.qweight, QuantWeight) and layer.mlp.gate_up_proj.qweight.layout == (
            4, 32, True, False, 0)
    prompt = [3, 17, 99, 5, 60, 2, 41, 7]
    tokens, logits = greedy(ours, prompt)
    ref_tokens, ref_logits = greedy(load_model(ref_dir, torch.device("cpu"), torch.float32), prompt)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    # bits per weight: Q4_K 4 + 2 * 16 / 32 = 5, Q6_K 8 + 16 / 16 = 9; norms float32 (4 bytes)
    vocab = 258
    per_layer = ((HEADS + KV) * D * H * 5 + KV * D * H * 9 + H * HEADS * D * 5 + 2 * INTER * H * 5 + H * INTER * 9) // 8
    norms = 4 * (H + LAYERS * (2 * H + 2 * D))
    assert loaded_bytes(ours) == checkpoint_weight_bytes(q_dir, 4) == (vocab * H * (5 + 9)) // 8 + LAYERS * per_layer \
        + norms


def test_gguf_blocks_saved_in_our_layout_keep_their_zero_codes(tmp_path):
    """save_quantized writes each weight's zero code: the Q4_K_M miniature's tensors in our own layout read back
    equal and load to the same model (qkv in parts) with the same logits and bytes; a file written before the zero
    code existed (4 numbers per weight) reads as zero 0."""
    write_tiny_gguf(tmp_path / "m.gguf", "qwen3", Q4_K_M)
    q_dir = import_gguf(tmp_path / "m.gguf", tmp_path / "cache", quantized=True)
    raw = json.loads((q_dir / "config.json").read_text())
    tensors = dict(iter_quantized(q_dir, raw))
    own = tmp_path / "own"
    own.mkdir()
    save_quantized(own / "model.safetensors", tensors)
    (own / "config.json").write_text(json.dumps({**raw, "quantization_config": {"quant_method": "openclaw"}}))
    back = dict(_internal_tensors(own))
    assert back.keys() == tensors.keys() and back["model.layers.0.self_attn.v_proj.weight"].zero == 32
    for name, t in tensors.items():
        same = t.layout == back[name].layout and torch.equal(t.dequantize(), back[name].dequantize()) \
            if isinstance(t, QuantWeight) else torch.equal(t, back[name])
        assert same, name
    ours, reread = (load_model(d, torch.device("cpu"), torch.float32) for d in (q_dir, own))
    assert [p.zero for p in reread.model.layers[1].self_attn.qkv_proj.parts] == [0, 0, 32]
    ids = [3, 17, 99, 5, 60, 2, 41, 7]
    assert torch.equal(full_forward(ours, ids), full_forward(reread, ids))
    assert checkpoint_weight_bytes(own, 4) == loaded_bytes(reread) == loaded_bytes(ours)
    old = tmp_path / "old"
    old.mkdir()
    qw = gguf_to_quant("w", blocks(Q.Q4_1, 3, 64, np.random.default_rng(0)), Q.Q4_1, (3, 64))
    save_file({"w.qweight": qw.qweight, "w.scales": qw.scales, "w.offsets": qw.offsets}, str(old / "model.safetensors"),
              metadata={"openclaw.quant": json.dumps({"w": [4, 32, 3, 64], "w#parts": ["qweight", "scales", "offsets"]})})
    (read,) = _internal_tensors(old)
    assert read[0] == "w" and read[1].layout == (4, 32, True, False, 0)
    assert torch.equal(read[1].dequantize(), qw.dequantize())


def q4_k_m_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...], Layout | None]]:
    """A Q4_K_M file's tensors as gguf_tensor_layouts lists them: llama.cpp's use_more_bits rule puts attn_v and
    ffn_down in Q6_K for layers i < n/8, i >= 7n/8 and (i - n/8) % 3 == 2; token_embd Q4_K, output Q6_K."""
    n, h, inter, v = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", (v, h), Q4K), ("lm_head.weight", (v, h), Q6K), ("model.norm.weight", (h,), None)]
    for i in range(n):
        more = Q6K if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2 else Q4K
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (q, h), Q4K), (p + "self_attn.k_proj.weight", (kv, h), Q4K),
                (p + "self_attn.v_proj.weight", (kv, h), more), (p + "self_attn.o_proj.weight", (h, q), Q4K),
                (p + "mlp.gate_proj.weight", (inter, h), Q4K), (p + "mlp.up_proj.weight", (inter, h), Q4K),
                (p + "mlp.down_proj.weight", (h, inter), more)]
        out += [(p + f"{m}.weight", (d,), None) for m, d in [("input_layernorm", h), ("post_attention_layernorm", h),
                                                            ("self_attn.q_norm", 128), ("self_attn.k_norm", 128)]]
    return out


QWEN3_32B = {"model_type": "qwen3", "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
             "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
             "max_position_embeddings": 40960, "tie_word_embeddings": False}


def test_qwen3_32b_q4_k_m_weight_bytes_by_hand():
    """Q4_K: 4-bit codes + fp16 scale + fp16 offset per 32 = 5 bits per weight; Q6_K: 8-bit codes + an fp16 scale
    per 16 (its zero code 32 needs no offsets) = 9; the 32 layers whose v_proj is Q6_K keep q/k at 5 and v at 9 (the
    fused qkv stays in parts, none widened): 21.46 GiB."""
    tensors = q4_k_m_tensors(QWEN3_32B)
    h, inter, v = 5120, 25600, 151936
    six = sum(i < 8 or i >= 56 or (i - 8) % 3 == 2 for i in range(64))
    assert six == 32
    q, kv, o, mlp = 8192 * h, 1024 * h, h * 8192, h * inter
    bits = (v * h * 5 + v * h * 9 + six * ((q + kv) * 5 + kv * 9 + o * 5 + 2 * mlp * 5 + mlp * 9)
            + (64 - six) * ((q + 2 * kv) * 5 + o * 5 + 3 * mlp * 5))
    norms = 2 * (h + 64 * (2 * h + 256))
    assert quantized_weight_bytes(tensors, 2, False, FAMILIES["qwen3"]) == bits // 8 + norms == 23_047_251_968


def test_qwen3_32b_q4_k_m_gguf_plan_fits_24_gib_for_one_budget_2048_sequence(tmp_path, monkeypatch):
    """`openclaw plan Qwen3-32B-Q4_K_M.gguf --vram 24 --kv-budget 2048 --max-seqs 1`, the header read replaced by its
    real tensor types: 21.46 GiB of weights leave 3,245 KV tokens (256 KiB each) beside the decode graphs (one batch
    size, length buckets up to 4096), one sequence of budget 2048 + 128; with 16 sequences the graphs of five batch
    sizes leave too few for one; at --vram 22 the refusal names the numbers, the GGUF repacking's bits per weight and
    the AWQ model that fits."""
    import openclaw.weights.gguf_blocks

    monkeypatch.setattr(openclaw.weights.gguf_blocks, "gguf_tensor_layouts",
                        lambda path: (dict(QWEN3_32B), q4_k_m_tensors(QWEN3_32B)))
    path = tmp_path / "Qwen3-32B-Q4_K_M.gguf"
    path.touch()
    p, name, fitting = plan_model(str(path), tmp_path, 24, 2048, max_seqs=1)
    assert p.weights == 23_047_251_968 and "gguf" in p.weight_format
    fixed = p.context + p.workspace + p.weights + p.activations + p.graphs + p.graph_overhead
    assert p.graph_overhead == 5 * GRAPH_OVERHEAD  # length buckets 256 .. 4096: the pool is shorter than 4096
    assert p.kv_tokens == (24 * GIB - fixed) // (256 * 1024) == 3245
    assert p.seqs == 1 and p.fits()
    p16, _, _ = plan_model(str(path), tmp_path, 24, 2048, max_seqs=16)
    assert p16.seqs == 0 and not p16.fits() and p16.graph_overhead == 5 * 5 * GRAPH_OVERHEAD  # buckets to 4096
    p, name, fitting = plan_model(str(path), tmp_path, 22, None)
    assert "Qwen3-32B" in fitting  # the AWQ checkpoint
    with pytest.raises(OpenClawError, match=r"does not fit in 22.0 GiB: weights 21.46 GiB .*--vram 23\.8 or more"
                                            r".*Q6_K: 9 bits per weight.*AWQ.*models that fit: .*Qwen3-32B"):
        p.require(name, smaller=fitting)
    # what the refusal names is enough, and more memory never plans a smaller pool (graphs counted per bucket)
    pools = [plan_model(str(path), tmp_path, v / 10, None)[0].kv_tokens for v in range(236, 250)]
    assert pools[2] >= 1024 > pools[1] and pools == sorted(pools)


@pytest.mark.slow
def test_smollm2_gguf_runs_quantized_when_asked_with_the_dequantized_greedy_output(smollm2_gguf, smol_model_dir):
    """`--quantize nf4` on a CPU: the GGUF stays in its Q4_1 / Q8_0 blocks (the route a GPU takes by default); the
    greedy answer equals the dequantized import's (what a CPU loads by default)."""
    from openclaw.config import EngineConfig, SamplingParams
    from openclaw.llm import LLM

    cache = smol_model_dir.parent.parent  # the session's cache: the float32 import is there already
    common = {"model": str(smollm2_gguf), "device": "cpu", "dtype": "float32", "kv_tokens": 512, "cache_dir": cache}
    quantized = LLM(EngineConfig(quantize="nf4", **common))
    plain = LLM(EngineConfig(**common))
    assert (quantized.model_dir / "model.gguf").is_symlink() and quantized.engine.model.quantized
    assert plain.model_dir == smol_model_dir and not plain.engine.model.quantized
    params = SamplingParams(temperature=0, max_tokens=24)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answers = [llm.generate([llm.chat_request(messages, params)])[0].text for llm in (quantized, plain)]
    assert answers[0] == answers[1] and "Paris" in answers[0]
