"""Convert a llama / qwen2 / qwen3 / glm4 / deepseek2 (GLM-4.7-Flash) GGUF file, once, into a Hugging Face directory
the loader reads.

Owns the byte-level BPE tokenizer, the writing and the cache of converted directories; the GGUF -> HF mapping of
configs and tensors is openclaw.weights.gguf_arch's. It does not quantize: tensors are dequantized to float32 and
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
from openclaw.weights.gguf_arch import Entry, architecture, field, tensor_plan
from openclaw.weights.gguf_arch import config as gguf_config
from openclaw.weights.gguf_header import check_header
from openclaw.weights.integrity import RECORD, damage, read_files, write_record

# Part of the cache key: bump it when the output changes so directories written by an older importer are not reused.
FORMAT_VERSION = 1

# Qwen2's split (also Qwen3's): letters keep one leading non-letter, digits stand alone, newlines group.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GLM-4's split (llama.cpp's "glm4" / "chatglm-bpe" pre-tokenizer): as GPT-4's, numbers in runs of up to three digits
_GLM4_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
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
    config = gguf_config(reader, arch, gguf_path)
    plan = tensor_plan(reader, arch, gguf_path, config)
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


def _tokenizer(reader: gguf.GGUFReader, path: Path, max_length: int) -> tuple[Tokenizer, dict]:
    """Byte-level BPE rebuilt from the vocabulary, merges and token types, with the pre-tokenizer its `pre` names."""
    kind = field(reader, "tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in reader.fields:
        raise OpenClawError(f"{path} carries no tokenizer; use a GGUF converted with its tokenizer.")
    if kind != "gpt2":
        raise OpenClawError(
            f"{path} has a {kind!r} tokenizer; only byte-level BPE ('gpt2') GGUF tokenizers are supported yet."
        )
    pre = field(reader, "tokenizer.ggml.pre")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", False))
    if pre == "smollm":  # llama.cpp splits every digit first, then applies the GPT-2 regex
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=prefix)]
        )
    elif pre == "gpt2":  # llama.cpp's "default" is a different regex set, so it is not accepted here
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    elif pre in ("glm4", "chatglm-bpe"):
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_GLM4_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False),
            ]
        )
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
        raise OpenClawError(f"{path} needs the {pre!r} pre-tokenizer; supported: smollm, qwen2, glm4, gpt2.")
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) must encode as one id, never be cut into bytes; user-defined ones (<think>) too.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
                          if k == _USER_DEFINED])

    def token(key: str) -> str | None:
        index = field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    # GLM's chat template writes its own [gMASK]<sop>: llama.cpp never adds a BOS for the glm4 pre-tokenizer
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", False)) and pre not in ("glm4", "chatglm-bpe")
    add_eos = bool(field(reader, "tokenizer.ggml.add_eos_token", False))
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
        "chat_template": field(reader, "tokenizer.chat_template"),
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


def _write_tensors(out: Path, plan: list[Entry], progress: Callable[[int, int], None] | None) -> None:
    tensors = {}
    for done, entry in enumerate(plan, 1):
        # F32 tensors come back as read-only views of the mapped file; only those are copied.
        tensors[entry.name] = torch.from_numpy(np.require(entry.dequantized(), np.float32, ["C", "W"]))
        if progress is not None:
            progress(done, len(plan))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def _write_metadata(out: Path, config: dict, tokenizer: Tokenizer, tokenizer_config: dict) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    for name, data in [("config.json", config), ("tokenizer_config.json", tokenizer_config),
                       ("generation_config.json", generation)]:
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
