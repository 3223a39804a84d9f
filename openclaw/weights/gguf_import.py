"""Convert a llama / qwen2 / qwen3 GGUF file, once, into a Hugging Face directory the loader reads.

Owns the GGUF -> HF mapping (config fields, tensor names, llama.cpp's Q/K row permutation, the byte-level BPE
tokenizer) and the cache of converted directories. It does not quantize: tensors are dequantized to float32 and
the loader picks the runtime format, or (quantized=True) stay in the GGUF file, which openclaw.weights.gguf_blocks repacks
at load. Sentencepiece vocabularies and llama3-style rope_freqs are not handled yet.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from openclaw.errors import OpenClawError
from openclaw.models import FAMILIES
from openclaw.weights.gguf_header import check_header
from openclaw.weights.integrity import RECORD, damage, read_files, write_record

# Part of the cache key: bump it when the output changes so directories written by an older importer are not reused.
FORMAT_VERSION = 1

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Qwen2's split (also Qwen3's): letters keep one leading non-letter, digits stand alone, newlines group.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def import_gguf(gguf_path: Path, cache_dir: Path, progress: Callable[[int, int], None] | None = None,
                quantized: bool = False, verify: bool = False) -> Path:
    """The HF directory converted from `gguf_path`, converting it under `cache_dir / "gguf"` on the first call.

    `progress(done_tensors, total_tensors)` is called after each tensor of a conversion. quantized=True writes no
    weights: the directory links to the GGUF file (model.gguf) and its config.json says quantization_config
    {"quant_method": "gguf"}, so the loader streams the file's blocks through openclaw.weights.gguf_blocks, still quantized.
    A converted directory is checked against the record written with it (sizes; sha256 with verify) each time it is
    reused, and converted again when it fails: a file cut short, deleted or (verify) changed is never loaded.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise OpenClawError(f"GGUF file {gguf_path} does not exist; check the path.")
    name = f"{gguf_path.stem}-{_fingerprint(gguf_path)}"
    if quantized:  # the link is part of the result: the same bytes at another path get their own directory
        name += "-q-" + hashlib.sha256(str(gguf_path.resolve()).encode()).hexdigest()[:8]
    final = Path(cache_dir) / "gguf" / name
    if final.is_dir():
        files = read_files(final, RECORD)
        if files is not None and damage(final, files, verify) is None:
            return final
        _set_aside(final)  # damaged, or from before records: built again below

    reader = _open(gguf_path)
    arch = architecture(reader, gguf_path)
    # Everything is checked before anything is written, so a bad file fails in seconds, not after minutes.
    config = _config(reader, arch, gguf_path)
    plan = _tensor_plan(reader, arch, gguf_path, config)
    tokenizer, tokenizer_config = _tokenizer(reader, gguf_path, config["max_position_embeddings"])

    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # A hidden sibling renamed into place at the end: an interrupted run never leaves a directory that looks done.
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp's private 0700 would outlive the rename
        try:
            if quantized:
                config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "model.gguf"}
                (tmp / "model.gguf").symlink_to(gguf_path.resolve())
            else:
                _write_tensors(tmp, plan, progress)
            _write_metadata(tmp, config, tokenizer, tokenizer_config)
            write_record(tmp)
            try:
                tmp.rename(final)
            except OSError:
                if not final.is_dir():  # otherwise another process finished the same file first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise OpenClawError(
            f"Could not write the converted model under {final.parent} ({exc}); free disk space or use another cache dir."
        ) from exc
    return final


def _set_aside(directory: Path) -> None:
    """Move a damaged conversion out of the way (a rename, so a process still reading it keeps its files), then
    delete it; another process that set it aside first is fine."""
    aside = directory.with_name(f".{directory.name}.damaged-{os.getpid()}")
    try:
        directory.rename(aside)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OpenClawError(f"{directory} is damaged and could not be moved aside ({exc}); delete that directory") from exc
    shutil.rmtree(aside, ignore_errors=True)


def architecture(reader: gguf.GGUFReader, path: Path) -> str:
    """The file's general.architecture, which names a model_type of the family table for the architectures we
    import; a one-line error for any other."""
    arch = _field(reader, "general.architecture")
    if arch not in FAMILIES:
        raise OpenClawError(f"{path} is a {arch!r} model; the GGUF importer supports only {', '.join(FAMILIES)}.")
    return arch


def _fingerprint(path: Path) -> str:
    """A cheap content key: size plus first and last MiB (hashing a 20 GB file would take a minute)."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{FORMAT_VERSION}:{size}".encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:12]


def _open(path: Path) -> gguf.GGUFReader:
    check_header(path)  # before GGUFReader allocates for what the header claims
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, struct/index errors, ... on bad or truncated bytes
        raise OpenClawError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); it may be truncated, re-download it."
        ) from exc


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _tensor_plan(
    reader: gguf.GGUFReader, arch: str, path: Path, config: dict
) -> list[tuple[gguf.ReaderTensor, str, int | None]]:
    """(tensor, HF name, heads to un-permute by or None) for every tensor, after checking each can be read."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    plan = []
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise OpenClawError(f"{path} uses llama3-style rope scaling (rope_freqs), which is not supported yet.")
        parts = t.name.split(".")
        if t.name in _GLOBAL_NAMES:
            hf = _GLOBAL_NAMES[t.name]
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
            hf = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
        else:
            raise OpenClawError(f"{path} holds tensor {t.name!r}, which the {arch} importer does not know.")
        # llama.cpp's converter permutes Q/K rows only for the llama architecture (its rope pairs adjacent lanes).
        unpermute = {"attn_q": heads, "attn_k": kv_heads}.get(parts[2]) if arch == "llama" and len(parts) == 4 else None
        plan.append((t, hf, unpermute))
    for qtype in {t.tensor_type for t in reader.tensors}:
        sample = next(t for t in reader.tensors if t.tensor_type == qtype)
        try:
            gguf.quants.dequantize(sample.data.reshape(-1, sample.data.shape[-1])[:1], qtype)
        except NotImplementedError as exc:
            raise OpenClawError(
                f"{path} stores {sample.name} as {qtype.name}, which the gguf package cannot dequantize; "
                "use a file with another quantization (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, ...)."
            ) from exc
    return plan


def _config(reader: gguf.GGUFReader, arch: str, path: Path) -> dict:
    def get(key: str, default=None):
        return _field(reader, f"{arch}.{key}", default)

    for key in ["embedding_length", "feed_forward_length", "block_count", "attention.head_count", "context_length",
                "attention.layer_norm_rms_epsilon"]:
        if get(key) is None:
            raise OpenClawError(f"{path} lacks the metadata key {arch}.{key}; the file is incomplete, re-download it.")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # a per-layer array in some files; these families use one value
        if len(set(kv_heads)) != 1:
            raise OpenClawError(f"{path} has a different KV head count per layer, which is not supported.")
        kv_heads = kv_heads[0]
    head_dim = get("attention.key_length", hidden // heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise OpenClawError(f"{path} rotates only part of each head (partial rope), which is not supported.")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise OpenClawError(f"{path} has no token_embd.weight tensor; the file is incomplete or not a language model.")
    vocab = int(names["token_embd.weight"].shape[1])  # ggml order: [hidden, vocab]
    return {
        "architectures": [FAMILIES[arch].architectures[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),  # llama.cpp's default when the key is absent
        "rope_scaling": _rope_scaling(reader, arch, path),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def _rope_scaling(reader: gguf.GGUFReader, arch: str, path: Path) -> dict | None:
    def get(key: str, default=None):
        return _field(reader, f"{arch}.rope.{key}", default)

    kind = get("scaling.type", "linear" if get("scale_linear") else "none")
    factor = get("scaling.factor", get("scale_linear"))
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor}
        for gguf_key, hf_key in [("original_context_length", "original_max_position_embeddings"),
                                 ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")]:
            if (value := get(f"scaling.{gguf_key}")) is not None:
                scaling[hf_key] = value
        return scaling
    raise OpenClawError(f"{path} uses rope scaling {kind!r}; only linear and yarn are supported.")


def _tokenizer(reader: gguf.GGUFReader, path: Path, max_length: int) -> tuple[Tokenizer, dict]:
    """Byte-level BPE rebuilt from the vocabulary, merges and token types, with the pre-tokenizer its `pre` names."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in reader.fields:
        raise OpenClawError(f"{path} carries no tokenizer; use a GGUF converted with its tokenizer.")
    if kind != "gpt2":
        raise OpenClawError(
            f"{path} has a {kind!r} tokenizer; only byte-level BPE ('gpt2') GGUF tokenizers are supported yet."
        )
    pre = _field(reader, "tokenizer.ggml.pre")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
    if pre == "smollm":  # llama.cpp splits every digit first, then applies the GPT-2 regex
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=prefix)]
        )
    elif pre == "gpt2":  # llama.cpp's "default" is a different regex set, so it is not accepted here
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    elif pre == "qwen2":
        # Qwen's own tokenizer.json normalizes to NFC; its merges were learned on NFC text.
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False),
            ]
        )
    else:
        raise OpenClawError(f"{path} needs the {pre!r} pre-tokenizer; supported: smollm, qwen2, gpt2.")
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) must encode as one id, never be cut into bytes; user-defined ones (<think>) too.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
                          if k == _USER_DEFINED])

    def token(key: str) -> str | None:
        index = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    bos, eos = token("bos"), token("eos")
    if (add_bos and bos) or (add_eos and eos):
        first = [bos] if add_bos and bos else []
        last = [eos] if add_eos and eos else []
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join([*first, "$A", *last]),
            pair=" ".join([*first, "$A", *last, *first, "$B:1", *last]),
            special_tokens=[(t, tokens.index(t)) for t in {*first, *last}],
        )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    return tokenizer, config


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K permutation: w: [n_head * D, ...] from rows interleaved in (i, half) pairs
    per head (GGML's rope) back to [first half; second half] per head (HF's rotate_half)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tensors(out: Path, plan: list, progress: Callable[[int, int], None] | None) -> None:
    tensors = {}
    for done, (t, name, unpermute) in enumerate(plan, 1):
        # ggml lists dimensions fastest-first; numpy wants them slowest-first.
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        if unpermute:
            w = _unpermute(w, unpermute)
        # F32 tensors come back as read-only views of the mapped file; only those are copied.
        tensors[name] = torch.from_numpy(np.require(w, np.float32, ["C", "W"]))
        if progress is not None:
            progress(done, len(plan))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def _write_metadata(out: Path, config: dict, tokenizer: Tokenizer, tokenizer_config: dict) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    for name, data in [("config.json", config), ("tokenizer_config.json", tokenizer_config),
                       ("generation_config.json", generation)]:
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
