"""AWQ and bitsandbytes checkpoints -> QuantWeight: packing of known weights against each format's published
layout, the format's own dequantization, errors, and tiny Qwen3 models whose greedy output matches their
dequantized reference. GGUF is in test_quant_gguf.py."""

import json
from pathlib import Path

import pytest
import torch
from openclaw.kernels.qlinear import quantize_rtn
from safetensors.torch import save_file
from tiny_models import full_forward, make_hf_model

from openclaw.errors import OpenClawError
from openclaw.weights.formats import (
    NF4_CODE,
    awq_to_quant,
    bnb_state,
    bnb_to_quant,
    detect_format,
    iter_quantized,
    nf4_codes,
    quantize_nf4,
)
from openclaw.weights.layout import rtn_group
from openclaw.weights.loader import load_model

# K a multiple of 128 (AWQ's group) everywhere: hidden 128, o_proj 4 x 32, down_proj 256
SHAPES = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True,
              "modules_to_not_convert": None}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def awq_pack(ints: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's published GEMM rule, written out: int32 [R, C / 8] whose nibble i of column j holds column
    8j + [0, 2, 4, 6, 1, 3, 5, 7][i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    out = torch.zeros(ints.shape[0], ints.shape[1] // 8, dtype=torch.int64)
    for j in range(out.shape[1]):
        for i in range(8):
            out[:, j] |= ints[:, 8 * j + order[i]].long() << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # the same 32 bits, as int32


def awq_quantize(w: torch.Tensor, group: int = 128):
    """Round-to-nearest AWQ ints for w [N, K]: q [K, N], zeros [K / group, N], scales fp16 [K / group, N]."""
    n, k = w.shape
    wg = w.T.reshape(k // group, group, n)
    lo, hi = wg.amin(1), wg.amax(1)
    s = ((hi - lo) / 15).clamp_min(1e-6).half()
    z = (-lo / s.float()).round().clamp(0, 15)
    q = (wg / s.float()[:, None] + z[:, None]).round().clamp(0, 15)
    return q.reshape(k, n).int(), z.int(), s


def greedy(model, prompt: list[int], steps: int = 12) -> tuple[list[int], torch.Tensor]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(full_forward(model, ids)[-1].argmax()))
    return ids[len(prompt):], full_forward(model, ids)


def write_reference(src: Path, out: Path, weights: dict[str, torch.Tensor]) -> Path:
    """An unquantized checkpoint with `weights`; embeddings and lm_head as the loader stores them in a quantized
    model (8-bit round-to-nearest), so it is the quantized model's exact dequantized twin."""
    out.mkdir()
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = weights[name]
        weights[name] = quantize_rtn(w, 8, rtn_group(w.shape[1])).dequantize()
    save_file({k: v.float().contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    return out


def assert_same_greedy(quantized_dir: Path, reference_dir: Path, atol: float, nf4: bool = False) -> None:
    ours = load_model(quantized_dir, torch.device("cpu"), torch.float32, nf4=nf4)
    ref = load_model(reference_dir, torch.device("cpu"), torch.float32)
    assert ours.quantized and not ref.quantized
    prompt = [3, 17, 99, 5, 60, 2, 41, 7]
    tokens, logits = greedy(ours, prompt)
    ref_tokens, ref_logits = greedy(ref, prompt)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=atol)


def test_awq_nibble_order_is_autoawqs():
    """Columns 1..8 packed by AutoAWQ's order [0, 2, 4, 6, 1, 3, 5, 7] read 0x86427531 (a negative int32)."""
    assert awq_pack(torch.arange(1, 9)[None]).item() == 0x86427531 - 2**32
    qweight = torch.tensor([[0x86427531 - 2**32] * 2] * 128, dtype=torch.int32)  # K 128, N 16
    qzeros = torch.tensor([[0x00000000, 0x11111111]], dtype=torch.int32)
    qw = awq_to_quant("x.qweight", qweight, qzeros, torch.ones(1, 16, dtype=torch.float16), 128)
    assert qw.codes()[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8] * 2
    assert qw.offsets[:, 0].tolist() == [0.0] * 8 + [-1.0] * 8


def test_awq_known_weights_convert_exactly():
    gen = torch.Generator().manual_seed(0)
    k, n, g = 256, 48, 128
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(0, 16, (k // g, n), generator=gen)
    s = (torch.rand(k // g, n, generator=gen) * 0.02 + 1e-3).half()
    qw = awq_to_quant("x.qweight", awq_pack(q), awq_pack(z), s, g)
    assert (qw.shape, qw.bits, qw.group, qw.lut) == ((n, k), 4, g, None)
    assert torch.equal(qw.codes(), q.T.to(torch.uint8))
    assert torch.equal(qw.scales, s.T)
    assert torch.equal(qw.offsets, (-z.float() * s.float()).half().T)
    # AWQ's own dequantization (q - z) * s, up to the one float16 rounding of z * s
    ref = ((q - z.repeat_interleave(g, 0)) * s.float().repeat_interleave(g, 0)).T
    bound = (z.float() * s.float()).abs().max() * 2**-11
    assert 0 < (qw.dequantize() - ref).abs().max() <= bound


@pytest.mark.parametrize("field, value, message", [
    ("version", "gemv", "version is 'gemv'"), ("bits", 8, "bits is 8"), ("zero_point", False, "zero_point is False"),
    ("group_size", None, "group_size is None"), ("quant_method", "gptq", "quant_method 'gptq' is not supported")])
def test_unsupported_quantization_configs_are_refused(tmp_path, field, value, message):
    with pytest.raises(OpenClawError, match=message):
        detect_format(tmp_path, {"quantization_config": dict(AWQ_CONFIG, **{field: value})})
    with pytest.raises(OpenClawError, match="LLM.int8"):
        detect_format(tmp_path, {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}})


def test_detect_format():
    assert detect_format(Path("m"), {"model_type": "qwen3"}) == "unquantized"
    assert detect_format(Path("m"), {"quantization_config": AWQ_CONFIG}) == "awq"
    assert detect_format(Path("m"), {"quantization_config": {"quant_method": "bitsandbytes"}}) == "bitsandbytes"
    assert detect_format(Path("m"), {"quantization_config": {"quant_method": "gguf"}}) == "gguf"


def make_awq_checkpoint(tmp_path: Path, **overrides) -> tuple[Path, Path]:
    """A tiny Qwen3 in the Qwen3-32B-AWQ layout, and its dequantized reference."""
    hf = make_hf_model("qwen3", tmp_path / "hf", **dict(SHAPES, **overrides))
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    tensors, reference = {}, dict(state)
    for name, w in state.items():
        if name.split(".")[-2] in LINEARS and name.endswith(".weight"):
            q, z, s = awq_quantize(w)
            base = name[: -len(".weight")]
            tensors |= {f"{base}.qweight": awq_pack(q), f"{base}.qzeros": awq_pack(z), f"{base}.scales": s}
            reference[name] = ((q - z.repeat_interleave(128, 0)) * s.float().repeat_interleave(128, 0)).T
        else:
            tensors[name] = w.half()  # AWQ checkpoints keep the rest in fp16
            reference[name] = w.half().float()
    awq = tmp_path / "awq"
    awq.mkdir()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (awq / "config.json").write_text(json.dumps(dict(config, quantization_config=AWQ_CONFIG)))
    save_file(tensors, str(awq / "model.safetensors"))
    return awq, write_reference(awq, tmp_path / "ref", reference)


def test_tiny_awq_model_greedy_matches_its_dequantized_reference(tmp_path):
    awq, ref = make_awq_checkpoint(tmp_path)
    names = [n for n, _ in iter_quantized(awq, json.loads((awq / "config.json").read_text()))]
    assert "model.layers.0.self_attn.q_proj.weight" in names and not any("qweight" in n for n in names)
    assert_same_greedy(awq, ref, atol=5e-3)  # AWQ logits ~0.5; fp16(z * s) costs ~1e-3


def test_awq_tensors_that_disagree_are_refused(tmp_path):
    awq, _ = make_awq_checkpoint(tmp_path)
    config = json.loads((awq / "config.json").read_text())
    wrong = dict(config, intermediate_size=128)
    (awq / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(OpenClawError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape .* config\.json implies"):
        load_model(awq, torch.device("cpu"), torch.float32)
    (awq / "config.json").write_text(json.dumps(dict(config, quantization_config=dict(AWQ_CONFIG, group_size=64))))
    with pytest.raises(OpenClawError, match=r"tensor model\.layers\.0\.\S+\.qweight: scales \(2, \d+\) should be \(4, "):
        list(iter_quantized(awq, json.loads((awq / "config.json").read_text())))
    (awq / "model.safetensors").write_bytes((awq / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(OpenClawError, match="model.safetensors is unreadable or truncated"):
        list(iter_quantized(awq, json.loads((awq / "config.json").read_text())))


def test_nf4_codes_follow_the_published_table():
    code = torch.tensor(NF4_CODE)
    absmax = torch.tensor([0.5, 3.0])
    idx = torch.randint(0, 16, (2, 64), generator=torch.Generator().manual_seed(0))
    idx[:, 0] = 15  # each block reaches its absmax
    codes, got_absmax = nf4_codes(code[idx] * absmax[:, None], 64)
    assert torch.equal(codes.long(), idx) and torch.equal(got_absmax[:, 0], absmax)
    # off-grid values go to the nearest code
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(1))
    codes, absmax = nf4_codes(w, 64)
    x = w.view(8, 2, 64) / absmax[..., None]
    assert torch.equal(codes.long().view(8, 2, 64), (x[..., None] - code).abs().argmin(-1))
    qw = quantize_nf4(w)  # our layout: element 2i in the low nibble
    assert torch.equal(qw.qweight & 0xF, codes[:, 0::2]) and torch.equal(qw.qweight >> 4, codes[:, 1::2])
    assert torch.equal(qw.lut, code) and torch.equal(qw.scales, absmax.half()) and qw.group == 64


def test_nf4_at_load_matches_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = (torch.randn(48, 256, generator=torch.Generator().manual_seed(2)) * 0.05).bfloat16()
    w[3, 64:128] = 0  # an all-zero block
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    theirs = bnb_to_quant("w", packed, {"shape": [48, 256], "blocksize": 64, "quant_type": "nf4"},
                          {"absmax": state.absmax, "quant_map": state.code})
    ours = quantize_nf4(w)
    for part in ("qweight", "scales", "lut"):
        assert torch.equal(getattr(ours, part), getattr(theirs, part)), part
    ref = bnbf.dequantize_4bit(packed, state).float()  # bitsandbytes' output dtype is the input's: bf16
    torch.testing.assert_close(ours.dequantize(), ref, rtol=2**-8, atol=0)


@pytest.mark.parametrize("k", [128, 96])
def test_prequantized_double_quantized_bnb_weight(k):
    """bitsandbytes' serialized form (as_dict(packed=True)); with K = 96 the 64-blocks straddle rows, which our
    layout cannot hold, and the weight comes back dequantized."""
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(40, k, generator=torch.Generator().manual_seed(3)) * 0.05
    packed, qs = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    saved = qs.as_dict(packed=True)
    assert saved["absmax"].dtype == torch.uint8 and "nested_absmax" in saved
    state = bnb_state("w", saved["quant_state.bitsandbytes__nf4"])
    got = bnb_to_quant("w", packed, state, saved)
    # the published rule: element 2i in the high nibble of byte i, element j scaled by absmax[j // 64], absmax
    # double-quantized (bitsandbytes' own CPU dequantize_4bit kernel gets straddling blocks wrong, so not it)
    flat = packed.view(-1)
    codes = torch.stack((flat >> 4, flat & 0xF), -1).view(-1).long()
    absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    ref = (torch.tensor(NF4_CODE)[codes] * absmax.repeat_interleave(64)).view(40, k)
    if k == 96:
        assert isinstance(got, torch.Tensor) and torch.equal(got, ref)
        return
    assert torch.equal(got.codes().view(-1), codes.to(torch.uint8))
    torch.testing.assert_close(got.dequantize(), ref, rtol=2**-11, atol=0)  # absmax rounded once to float16
    torch.testing.assert_close(bnb.functional.dequantize_4bit(packed, qs), ref, rtol=0, atol=0)


def test_tiny_bnb_model_greedy_matches_its_dequantized_reference(tmp_path):
    """A checkpoint written by transformers + bitsandbytes itself (nf4, double quantization), as unsloth's are."""
    bnb = pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    from bitsandbytes.functional import QuantState
    from safetensors import safe_open

    make_hf_model("qwen3", tmp_path / "hf", **SHAPES)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", quantization_config=config,
                                                              device_map="cpu", dtype=torch.float32)
    model.save_pretrained(tmp_path / "bnb")
    raw = json.loads((tmp_path / "bnb" / "config.json").read_text())
    assert detect_format(tmp_path / "bnb", raw) == "bitsandbytes"
    with safe_open(str(tmp_path / "bnb" / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    reference = {}
    for name, t in saved.items():
        parts = {k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(name + ".")}
        if parts:
            reference[name] = bnb.functional.dequantize_4bit(t, QuantState.from_dict(parts, torch.device("cpu")))
        elif ".weight." not in name:  # not one of a quantized weight's parts
            reference[name] = t
    assert sum(t.dtype == torch.uint8 for t in saved.values()) > 7 * raw["num_hidden_layers"]
    got = dict(iter_quantized(tmp_path / "bnb", raw))
    assert got.keys() == reference.keys()
    assert_same_greedy(tmp_path / "bnb", write_reference(tmp_path / "bnb", tmp_path / "ref", reference), atol=1e-3)


def test_nf4_at_load_streams_only_decoder_linears(tmp_path):
    make_hf_model("qwen3", tmp_path, **SHAPES)
    raw = json.loads((tmp_path / "config.json").read_text())
    got = dict(iter_quantized(tmp_path, raw, nf4=True))
    quantized = {n for n, t in got.items() if not isinstance(t, torch.Tensor)}
    assert len(quantized) == 7 * raw["num_hidden_layers"] and all(n.split(".")[-2] in LINEARS for n in quantized)
    assert isinstance(got["model.embed_tokens.weight"], torch.Tensor)


def test_tiny_model_quantized_to_nf4_at_load_greedy_matches_bitsandbytes_dequantized(tmp_path):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    hf = make_hf_model("qwen3", tmp_path / "hf", **SHAPES)
    reference = {}
    for name, w in hf.state_dict().items():
        if name.split(".")[-2] in LINEARS:
            reference[name] = bnbf.dequantize_4bit(*bnbf.quantize_4bit(w.detach(), blocksize=64, quant_type="nf4"))
        else:
            reference[name] = w.detach().clone()
    assert_same_greedy(tmp_path / "hf", write_reference(tmp_path / "hf", tmp_path / "ref", reference), 1e-3, nf4=True)
