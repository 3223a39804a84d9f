"""Tiny random checkpoints of the real architectures, saved by transformers (the reference) as safetensors, and their
quantized copies in our own layout."""

import json
from pathlib import Path

import torch
from openclaw.kernels.qlinear import quantize_rtn
from openclaw.models.layers import BatchMeta
from safetensors.torch import load_file

from openclaw.engine.kv_pool import KVPool
from openclaw.weights.layout import eight_bit
from openclaw.weights.loader import save_quantized

TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-6}
# GLM-4-0414: head_dim 16 (8 rotary dims); GLM-4.7-Flash: MLA of latent 32 + RoPE key 8, 8 experts (2 chosen) + 1
# shared after one dense layer; both with the real models' odd choices (q/k/v bias; q LoRA, sigmoid routing)
TINY_GLM4 = {"head_dim": 16, "pad_token_id": 0}
TINY_GLM4_MOE_LITE = {"num_key_value_heads": 4, "moe_intermediate_size": 32, "n_routed_experts": 8,
                      "num_experts_per_tok": 2, "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                      "qk_rope_head_dim": 8, "v_head_dim": 24, "routed_scaling_factor": 1.8, "pad_token_id": 0}


def make_hf_model(kind: str, path: Path, **overrides):
    """Save a random transformers model of `kind` (llama, qwen2, qwen3, glm4, glm4_moe_lite) to path; return the HF
    model (fp32)."""
    import transformers

    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM),
           "glm4_moe_lite": (transformers.Glm4MoeLiteConfig, transformers.Glm4MoeLiteForCausalLM)}[kind]
    extra = {"glm4": TINY_GLM4, "glm4_moe_lite": TINY_GLM4_MOE_LITE}.get(kind, {})
    kw = TINY | extra | overrides
    if kind == "qwen3":
        kw.setdefault("head_dim", 24)  # Qwen3 decouples head_dim from hidden / heads
    torch.manual_seed(0)
    model = cls[1](cls[0](**kw)).eval()
    with torch.no_grad():  # random norms, biases and routing corrections so parity covers them
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("mlp.gate.weight"):  # routers that tell tokens apart, so many experts get chosen
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(path)
    return model


def full_forward(model, ids: list[int], dtype=torch.float32, device: str = "cpu") -> torch.Tensor:
    """Our model over ids in one step through a fresh pool: logits [T, V] of every position."""
    cfg = model.config
    pool = KVPool.for_config(cfg, len(ids), dtype, device)
    T = len(ids)
    meta = BatchMeta(slot_mapping=torch.arange(T, device=device), seqs=[(0, T, 0, T)],
                     sample_idx=torch.arange(T, device=device))
    with torch.inference_mode():
        return model(torch.tensor(ids, device=device), torch.arange(T, device=device), meta, pool.k, pool.v)


def quantized_copy(src, dst, bits: int = 4, group: int = 32, mixed: bool = False):
    """Our own layout of an HF checkpoint: every decoder linear RTN-quantized (v_proj 8-bit group 16 when mixed,
    as GGUF Q4_K_M mixes Q4_K and Q6_K); embeddings and lm_head stay full precision (the loader makes them 8-bit).
    Returns the dequantized reference directory's tensors."""
    dst.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(src / "model.safetensors"))
    tensors, ref = {}, {}
    for name, t in sd.items():
        if name.endswith("proj.weight"):
            qw = quantize_rtn(t, 8, 16) if mixed and "v_proj" in name else quantize_rtn(t, bits, group)
            tensors[name], ref[name] = qw, qw.dequantize()
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            tensors[name], ref[name] = t, quantize_rtn(t, 8, eight_bit(t.shape[1]).group).dequantize()
        else:
            tensors[name] = ref[name] = t
    save_quantized(dst / "model.safetensors", tensors)
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "openclaw"}}))
    return ref


GLM_SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                "<think>", "</think>"]
# GLM-4.7's shape of a chat: [gMASK]<sop>, role tokens, thinking opened by the generation prompt unless disabled
GLM_TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{{ '</think>' if enable_thinking is defined and "
                "not enable_thinking else '<think>' }}{% endif %}")


def add_char_tokenizer(path: Path, vocab_size: int = 128) -> list[int]:
    """A character-level tokenizer for a tiny model dir: GLM's special tokens, printable ASCII and newline, special
    fillers up to vocab_size (the first also the unknown token), GLM_TEMPLATE and GLM's stop tokens. -> eos ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    fill = [f"<|p{i}|>" for i in range(vocab_size - len(GLM_SPECIALS) - len(chars))]
    vocab = {t: i for i, t in enumerate(GLM_SPECIALS + chars + fill)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=fill[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM_SPECIALS + fill])
    tok.save(str(path / "tokenizer.json"))
    eos = [vocab[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": GLM_TEMPLATE,
                                                            "eos_token": "<|endoftext|>"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return eos
