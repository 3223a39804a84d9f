"""Model definitions, one file per family, and the one table of what OpenClaw can run: config.json model_type ->
family. A new family is one file ending in its Family, added to FAMILY_LIST. Models import kernels, never the
runtime (openclaw.*)."""

from openclaw.models import glm4, glm4_moe_lite, qwen3
from openclaw.models.family import Family

FAMILY_LIST: tuple[Family, ...] = (qwen3.FAMILY, glm4.FAMILY, glm4_moe_lite.FAMILY)
FAMILIES: dict[str, Family] = {model_type: f for f in FAMILY_LIST for model_type in f.architectures}
