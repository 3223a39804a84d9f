"""The options every `openclaw` command that loads a model shares: one definition each, so that a name, its help and
its default (taken from config.py's dataclasses) are the same in run, chat, serve, plan, bench, calibrate and eval.

It defines options and resolves the model argument; the commands themselves live in cli.py, cli_eval.py, cli_hub.py
and cli_bench.py. The eviction options stay in cli.py beside the commands that serve with them.
"""

from pathlib import Path
from typing import Annotated

import typer

from openclaw.config import EngineConfig, default_cache_dir
from openclaw.errors import OpenClawError

_E = EngineConfig()
DEFAULT_CACHE = default_cache_dir()
Model = Annotated[str | None, typer.Option("--model", "-m", show_default=False, help=(
    f"Manifest name (`openclaw models`), HF model directory, or .gguf file (default: {_E.model})."))]
ModelArg = Annotated[str | None, typer.Argument(metavar="[MODEL]", show_default=False,
                                                help="The model, as --model takes it.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[str, typer.Option(help="auto (bfloat16 on GPU, float16 on CPU), bfloat16, float16 or float32.")]
KvTokens = Annotated[int | None, typer.Option(
    help="KV pool size in tokens, all sequences together (default: what --vram leaves on a GPU; 32768 on a CPU).")]
Vram = Annotated[float | None, typer.Option(
    help="GiB of GPU memory OpenClaw may use, a hard cap (default: the card's total; ignored on a CPU).")]
Quantize = Annotated[str, typer.Option(
    help="nf4: quantize full-precision weights to NF4 while loading (a GGUF keeps its own blocks); none: as stored "
         "(GGUF dequantized); auto: nf4 on a GPU for GGUF files, bf16->nf4 models and weights that fit --vram only "
         "as NF4, none on a CPU.")]
MaxSeqs = Annotated[int, typer.Option(help="Sequences decoded together at most.")]
Threads = Annotated[int | None, typer.Option(
    help="CPU threads for torch (default: one per core this process may use). On a busy machine fewer can be faster; "
         "README's CPU tips.")]
CacheDir = Annotated[Path, typer.Option(envvar="OPENCLAW_CACHE", help="Where models and conversions are kept.")]
Verify = Annotated[bool, typer.Option("--verify", help="Hash every file of a converted or pulled model before loading "
                                      "(file sizes are always checked).")]


def model_spec(positional: str | None, option: str | None) -> str:
    """The model a command was given: a positional MODEL or --model (both only when they agree), else the default."""
    if positional and option and positional != option:
        raise OpenClawError(f"two models given: {positional!r} and --model {option!r}; give one")
    return positional or option or _E.model
