"""What the runtime needs of a model family: its config dataclass, its model class and its checkpoint-name mapping.

Each family file (qwen3.py, glm4.py, glm4_moe_lite.py) ends with one Family; models/__init__.py lists them. The config
dataclass is built from config.json with from_dict and answers the sizing questions the memory plan and the KV pool ask
(cache_shape, kv_bytes_per_token, linear_shapes, norm_elements, dense_bytes, activation_bytes), so nothing else
derives them from raw dicts. A model exposes `config`, `rope` and `bands` (layers.BandLayout: how TriAttention pairs
the vectors it attends with) and is called as model(ids, positions, BatchMeta, k_pool, v_pool).
"""

from collections.abc import Callable
from dataclasses import dataclass


def _unchanged(cfg: object, name: str, tensor):
    return tensor


@dataclass(frozen=True)
class Family:
    config: type  # config.from_dict(config.json dict) -> the family's config dataclass
    model: type  # model(config, quantized) -> the nn.Module
    # (config, checkpoint name) -> (parameter, part, parts), or None to skip the tensor
    checkpoint_target: Callable[[object, str], tuple[str, int, int] | None]
    packed_sizes: Callable[[object, str], list[int]]  # (config, fused parameter name) -> rows of each checkpoint part
    architectures: dict[str, str]  # the config.json model_types it defines -> Hugging Face's class name for each
    # (config, checkpoint name, tensor or QuantWeight) -> the tensor as the parameter expects it: checkpoint quirks
    # such as RoPE pairs stored adjacent (GLM) that the model reads in the half layout; applied before anything else
    sanitize: Callable = _unchanged
    # checkpoint-name suffixes of 2-D weights a quantized model still holds in full precision (never quantized at
    # load, dequantized when a checkpoint stores them quantized): MLA's kv_b_proj, an MoE router
    dense: tuple[str, ...] = ()
    fp32: tuple[str, ...] = ()  # checkpoint-name suffixes held in float32 whatever the model dtype (MoE routers)
