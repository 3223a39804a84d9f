"""GGUF import: the real SmolLM2 file against transformers' own GGUF loader, tiny written files for the other
families, the cache, and the errors a user can hit."""

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from openclaw.errors import OpenClawError
from openclaw.weights.gguf_arch import unpermute as _unpermute
from openclaw.weights.gguf_header import check_header
from openclaw.weights.gguf_import import import_gguf
from openclaw.weights.integrity import RECORD, damage

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def smol_import(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    """(converted dir, cache dir, progress calls) of the one conversion the tests share."""
    cache = tmp_path_factory.mktemp("cache")
    calls = []
    out = import_gguf(smollm2_gguf, cache, progress=lambda done, total: calls.append((done, total)))
    return out, cache, calls


@pytest.fixture(scope="session")
def hf_smol(smollm2_gguf: Path):
    """transformers' model and tokenizer read straight from the GGUF: the reference."""
    transformers = pytest.importorskip("transformers")
    kw = {"gguf_file": smollm2_gguf.name}
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter, written out: per head, rows [first half; second half] -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)  # 3 heads of D=8, 5 inputs
    assert not np.array_equal(_permute(w, 3), w)
    np.testing.assert_array_equal(_unpermute(_permute(w, 3), 3), w)
    np.testing.assert_array_equal(_unpermute(_permute(w[:, 0], 3), 3), w[:, 0])  # biases too


@pytest.mark.slow
def test_tensors_and_config_match_transformers(smol_import, hf_smol):
    out, _, calls = smol_import
    model, tok = hf_smol
    reference = model.state_dict()
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert names == set(reference) - {"lm_head.weight"}  # tied: the head is the embedding
        for name in names:
            ours = f.get_tensor(name)
            assert ours.dtype == torch.float32
            # Both sides dequantize the same bytes, so equality is the expected case (and 20x faster to check).
            if not torch.equal(ours, reference[name]):
                torch.testing.assert_close(ours, reference[name], rtol=0, atol=1e-6, msg=name)
    assert calls[-1] == (272, 272) and len(calls) == 272

    config, ref = json.loads((out / "config.json").read_text()), model.config
    rope = getattr(ref, "rope_parameters", None) or {"rope_theta": ref.rope_theta}
    assert config["rope_theta"] == rope["rope_theta"] == 100000.0
    assert config["rope_scaling"] is None
    for key in ["num_attention_heads", "num_key_value_heads", "num_hidden_layers", "hidden_size", "intermediate_size",
                "vocab_size", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"]:
        assert config[key] == getattr(ref, key), key
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (9, 3, True)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}

    # The directory is a complete HF checkpoint: transformers loads it and computes the same logits.
    import transformers

    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tok("The Devil's Dictionary is", add_special_tokens=False).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_tokenizer_matches_transformers(smol_import, hf_smol):
    out, _, _ = smol_import
    _, reference = hf_smol
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    texts = [
        (DATA / "devil_excerpt.txt").read_text(encoding="utf-8"),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|><repo_name>x<file_sep>",
        "naïve café — 東京 😀👍🏽 Ünïcödé Россия",
        "In 1881, 3.14159 and 1,000,000; x1y2 #42",
        "  leading, trailing  \n\n\n\ttabs\r\nand CRLF ",
        "it's I'LL don't we've",
    ]
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == reference(text, add_special_tokens=False).input_ids, text
        assert ours.encode(text).ids == ids  # SmolLM2 adds no BOS
        assert ours.decode(ids, skip_special_tokens=False) == text == reference.decode(ids)
    assert ours.encode("<|im_start|>", add_special_tokens=False).ids == [1]


@pytest.mark.slow
def test_tokenizer_splits_digits_like_llama_cpp(smol_import):
    """The one place we differ from transformers' GGUF tokenizer: SmolLM2's own tokenizer (and llama.cpp's
    'smollm' pre-tokenizer) cut every digit out before the GPT-2 regex, so a space run before a number stays
    whole; transformers skips that step and splits off the last space."""
    ours = Tokenizer.from_file(str(smol_import[0] / "tokenizer.json"))
    assert ours.encode("sp   12", add_special_tokens=False).tokens == ["sp", "ĠĠĠ", "1", "2"]


@pytest.mark.slow
def test_tokenizer_config_and_chat_template(smol_import, smollm2_gguf, hf_smol):
    out, _, _ = smol_import
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = gguf.GGUFReader(smollm2_gguf).fields["tokenizer.chat_template"].contents()
    assert config["chat_template"] == template == hf_smol[1].chat_template
    assert "<|im_start|>" in template
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert config["add_bos_token"] is False and config["model_max_length"] == 8192


@pytest.mark.slow
def test_second_call_reuses_the_directory(smol_import, smollm2_gguf):
    out, cache, _ = smol_import
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    start = time.perf_counter()
    again = import_gguf(smollm2_gguf, cache, progress=lambda *_: pytest.fail("converted twice"))
    assert time.perf_counter() - start < 0.5
    assert again == out and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert [p.name for p in (cache / "gguf").iterdir()] == [out.name]  # no temp dir left behind


@pytest.mark.slow
def test_truncated_file_is_rejected(smollm2_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with smollm2_gguf.open("rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(OpenClawError, match="not a readable GGUF file"):
        import_gguf(cut, tmp_path / "cache")
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_missing_and_non_gguf_files_are_rejected(tmp_path):
    with pytest.raises(OpenClawError, match="does not exist"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "cache")
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n" * 100)
    with pytest.raises(OpenClawError, match="not a readable GGUF file"):
        import_gguf(text, tmp_path / "cache")


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {}, 0
    for b in range(256):
        if b in keep:
            spelled[b] = chr(b)
        else:
            spelled[b], extra = chr(256 + extra), extra + 1
    return [spelled[b] for b in range(256)]


TINY = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "head_dim": 8, "inter": 48}


def _write_tiny_gguf(path: Path, arch: str, tied: bool = True, raw_tensor: gguf.GGMLQuantizationType | None = None,
                     tokenizer_model: str = "gpt2", bias: bool = False, qk_norm: bool = False) -> dict:
    """A small random model in GGUF as llama.cpp's converter writes it; returns its HF-named float32 tensors."""
    tokens = [*_bytes_to_unicode(), "Ġt", "he", "Ġthe", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 2) + [3, 3]
    w = gguf.GGUFWriter(path, arch)
    h, n, kv, d = TINY["hidden"], TINY["heads"], TINY["kv_heads"], TINY["head_dim"]
    for key, value in [("block_count", TINY["layers"]), ("context_length", 256), ("embedding_length", h),
                       ("feed_forward_length", TINY["inter"]), ("attention.head_count", n),
                       ("attention.head_count_kv", kv), ("attention.key_length", d), ("rope.dimension_count", d)]:
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 1e6)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_eos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), h), "output_norm.weight": (h,)}
    if not tied:
        shapes["output.weight"] = (len(tokens), h)
    for i in range(TINY["layers"]):
        shapes |= {f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.ffn_norm.weight": (h,),
                   f"blk.{i}.attn_q.weight": (n * d, h), f"blk.{i}.attn_k.weight": (kv * d, h),
                   f"blk.{i}.attn_v.weight": (kv * d, h), f"blk.{i}.attn_output.weight": (h, n * d),
                   f"blk.{i}.ffn_gate.weight": (TINY["inter"], h), f"blk.{i}.ffn_up.weight": (TINY["inter"], h),
                   f"blk.{i}.ffn_down.weight": (h, TINY["inter"])}
        if bias:
            shapes |= {f"blk.{i}.attn_q.bias": (n * d,), f"blk.{i}.attn_k.bias": (kv * d,),
                       f"blk.{i}.attn_v.bias": (kv * d,)}
        if qk_norm:
            shapes |= {f"blk.{i}.attn_q_norm.weight": (d,), f"blk.{i}.attn_k_norm.weight": (d,)}
    hf = {}
    for name, shape in shapes.items():
        if raw_tensor is not None and name == "token_embd.weight":
            block, size = gguf.GGML_QUANT_SIZES[raw_tensor]
            w.add_tensor(name, np.zeros((shape[0], shape[1] // block * size), np.uint8), raw_dtype=raw_tensor)
            continue
        value = rng.standard_normal(shape, dtype=np.float32)
        hf[name] = value
        part = name.split(".")
        if arch == "llama" and len(part) == 4 and part[2] in ("attn_q", "attn_k"):
            value = _permute(value, n if part[2] == "attn_q" else kv)
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("arch, tied, bias, qk_norm", [
    ("llama", False, False, False), ("qwen2", True, True, False), ("qwen3", False, False, True)])
def test_tiny_families_load_in_transformers(tmp_path, arch, tied, bias, qk_norm):
    """Each family's directory loads into its transformers class with no missing or extra weights, and llama's
    Q/K come back in HF order (the file holds them permuted)."""
    transformers = pytest.importorskip("transformers")
    written = _write_tiny_gguf(tmp_path / "tiny.gguf", arch, tied=tied, bias=bias, qk_norm=qk_norm)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "cache")
    config = json.loads((out / "config.json").read_text())
    assert (config["tie_word_embeddings"], config["attention_bias"], config["head_dim"]) == (tied, bias, 8)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == config["architectures"][0]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    q = "blk.1.attn_q.weight"
    torch.testing.assert_close(state["model.layers.1.self_attn.q_proj.weight"], torch.from_numpy(written[q]))
    torch.testing.assert_close(state["model.layers.1.self_attn.k_proj.weight"],
                               torch.from_numpy(written["blk.1.attn_k.weight"]))
    assert len(written) == len(state) - tied  # every written tensor landed (a tied head is the embedding)

    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert ours.encode("<|im_start|> the<|im_end|>").tokens == ["<|im_start|>", "Ġthe", "<|im_end|>"]


def test_unsupported_files_are_rejected(tmp_path):
    arch = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(arch, "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(OpenClawError, match="'mamba' model; the GGUF importer supports llama, qwen2, qwen3, glm4, deepseek2"):
        import_gguf(arch, tmp_path / "cache")

    _write_tiny_gguf(tmp_path / "q8_1.gguf", "llama", raw_tensor=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(OpenClawError, match="token_embd.weight as Q8_1"):
        import_gguf(tmp_path / "q8_1.gguf", tmp_path / "cache")

    _write_tiny_gguf(tmp_path / "spm.gguf", "llama", tokenizer_model="llama")
    with pytest.raises(OpenClawError, match="'llama' tokenizer; only byte-level BPE"):
        import_gguf(tmp_path / "spm.gguf", tmp_path / "cache")
    assert not any((tmp_path / "cache" / "gguf").glob("*"))  # nothing written for files that fail the checks


def test_interrupted_conversion_leaves_nothing_that_looks_finished(tmp_path):
    _write_tiny_gguf(tmp_path / "tiny.gguf", "qwen3", qk_norm=True)

    def interrupt(done: int, total: int) -> None:
        if done == total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_gguf(tmp_path / "tiny.gguf", tmp_path / "cache", progress=interrupt)
    assert not any((tmp_path / "cache" / "gguf").iterdir())
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "cache")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def _header(n_tensors: int, kvs: bytes, n_kv: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs


def _string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


@pytest.mark.parametrize("data, match", [
    # a token list of 600k one-letter strings: 5 MB of file, ~660 MB of GGUFReader objects
    (_header(0, _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 600_000) + (_string("a") * 600_000)),
     "600000 elements in one array"),
    (_header(0, _string("general.name") + struct.pack("<IQ", 8, 2**62)), "bytes past its end"),
    (_header(2**40, b""), "1099511627776 tensors"),
    (_header(0, b"", n_kv=2**33), "8589934592 key-value pairs"),
    (_header(0, _string("x") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1) * 6), "nested arrays"),
    (_header(0, _string("x") + struct.pack("<I", 77)), "unknown type 77"),
    (_header(1, _string("general.architecture") + struct.pack("<I", 8) + _string("llama") + _string("t")
             + struct.pack("<I", 9)), "9 dimensions in one tensor"),
])
def test_headers_that_claim_too_much_are_refused_before_reading(tmp_path, data, match):
    """A 31 MB GGUF whose header claimed a 2M-entry token list peaked at 3.5 GB of RAM inside GGUFReader."""
    path = tmp_path / "crafted.gguf"
    path.write_bytes(data)
    t0 = time.perf_counter()
    with pytest.raises(OpenClawError, match=match) as e:
        import_gguf(path, tmp_path / "cache")
    assert time.perf_counter() - t0 < 10 and "crafted.gguf" in str(e.value) and "\n" not in str(e.value)


def test_a_real_header_passes_the_bounds(smollm2_gguf):
    check_header(smollm2_gguf)  # 49152 tokens and 48900 merges


def _tensor_file(out: Path) -> Path:
    return out / "model.safetensors"


def test_damaged_conversions_are_rebuilt(tmp_path):
    """A truncated or deleted file was detected but never rebuilt (deleting it left the run stuck on "has no
    *.safetensors weights"); same-size damage gave garbage with exit 0 and is now found by verify."""
    _write_tiny_gguf(tmp_path / "tiny.gguf", "qwen3", qk_norm=True)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "cache")
    good = _tensor_file(out).read_bytes()
    record = json.loads((out / RECORD).read_text())["files"]
    assert set(record) == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                           "model.safetensors"} and record["model.safetensors"]["size"] == len(good)

    def damaged(change) -> bytes:
        change(_tensor_file(out))
        return _tensor_file(out).read_bytes() if _tensor_file(out).exists() else b""

    for change in (lambda f: f.write_bytes(good[:len(good) // 2]), lambda f: f.unlink()):
        assert damaged(change) != good
        assert import_gguf(tmp_path / "tiny.gguf", tmp_path / "cache") == out
        assert _tensor_file(out).read_bytes() == good
    middle = len(good) // 2
    assert damaged(lambda f: f.write_bytes(good[:middle] + bytes(4096) + good[middle + 4096:])) != good
    assert import_gguf(tmp_path / "tiny.gguf", tmp_path / "cache") == out  # sizes only: not seen without verify
    assert _tensor_file(out).read_bytes() != good
    assert import_gguf(tmp_path / "tiny.gguf", tmp_path / "cache", verify=True) == out
    assert _tensor_file(out).read_bytes() == good
    (out / RECORD).unlink()  # a directory from before records: converted again, with one
    assert import_gguf(tmp_path / "tiny.gguf", tmp_path / "cache") == out and (out / RECORD).is_file()
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [out.name]  # nothing set aside is left


def test_two_processes_converting_into_an_empty_cache_both_end_clean(tmp_path):
    _write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    code = ("import sys; from openclaw.weights.gguf_import import import_gguf; "
            "print(import_gguf(sys.argv[1], sys.argv[2]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, tmp_path / "tiny.gguf", tmp_path / "cache"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert all(rc == 0 and not err for rc, _, err in results), results
    [out] = {o.strip() for _, o, _ in results}
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [Path(out).name]
    assert damage(Path(out), json.loads((Path(out) / RECORD).read_text())["files"], verify=True) is None
