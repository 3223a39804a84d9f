"""What the runtime needs of a model family: its config dataclass, its model class and its checkpoint-name mapping.

Each family file (qwen3.py, ...) ends with one Family; models/__init__.py lists them. The config dataclass is built
from config.json with from_dict and answers the sizing questions the memory plan and the KV pool ask
(kv_bytes_per_token, linear_shapes, norm_elements, activation_bytes), so nothing else derives them from raw dicts.
"""

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    config: type  # config.from_dict(config.json dict) -> the family's config dataclass
    model: type  # model(config, quantized) -> the nn.Module
    checkpoint_target: Callable[[str], tuple[str, int, int] | None]  # checkpoint name -> (parameter, part, parts)
    packed_sizes: Callable[[object, str], list[int]]  # (config, fused parameter) -> rows of each checkpoint part
    architectures: dict[str, str]  # the config.json model_types it defines -> Hugging Face's class name for each
