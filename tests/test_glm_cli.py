"""The GLM families as a user runs them: `openclaw run --model DIR --dtype float32` answers with transformers' greedy
tokens through GLM's chat template, and `openclaw eval fidelity` equals full attention exactly at a budget that holds
the text and evicts with every policy at one that does not (tiny random glm4 and glm4_moe_lite models)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import add_char_tokenizer, make_hf_model

from openclaw.config import POLICIES
from openclaw.tokenizer import Tokenizer

TEXT = Path(__file__).parent / "data" / "devil_excerpt.txt"


def openclaw(*args, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openclaw", *map(str, args)], capture_output=True, text=True,
                          timeout=600, check=False, env={"PATH": "/usr/bin:/bin", "HOME": str(home),
                                                         "OPENCLAW_CACHE": str(home), "COLUMNS": "200"})


@pytest.fixture(scope="module", params=["glm4", "glm4_moe_lite"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, path)
    return path, hf, add_char_tokenizer(path)


def test_run_answers_with_transformers_greedy_tokens(tiny, tmp_path):
    path, hf, eos = tiny
    (tmp_path / "prompt.txt").write_text("What is the capital of France?\n")
    tok = Tokenizer.from_dir(path)
    text = tok.render_chat([{"role": "user", "content": "What is the capital of France?"}], enable_thinking=False)
    assert text.endswith("<|assistant|></think>")
    ids = tok.encode(text)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=eos)[0, len(ids):]
    expected = tok.decode([t for t in out.tolist() if t not in eos]).lstrip("\n")
    assert len(expected) >= 4  # the random model says something before any stop token
    r = openclaw("run", tmp_path / "prompt.txt", "--model", path, "--dtype", "float32", "--device", "cpu",
                 "--max-tokens", "32", "--temperature", "0", "--no-think", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


def test_eval_fidelity_is_exact_with_room_and_evicts_without(tiny, tmp_path):
    path, _, _ = tiny
    policies = ",".join(POLICIES)
    common = ["--model", path, "--text", TEXT, "--policies", policies, "--stats", "auto", "--windows", "1",
              "--window-len", "250", "--dtype", "float32", "--device", "cpu", "--score-from", "40"]
    r = openclaw("eval", "fidelity", *common, "--budgets", "300", "--json", tmp_path / "roomy.json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "roomy.json").read_text())["rows"]
    assert {row["policy"] for row in rows} == set(POLICIES)
    for row in rows:
        assert (row["kl"], row["top1"], row["evictions"]) == (0.0, 1.0, 0), row["label"]
    r = openclaw("eval", "fidelity", *common, "--budgets", "40", "--json", tmp_path / "tight.json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    for row in json.loads((tmp_path / "tight.json").read_text())["rows"]:
        assert row["policy"] == "full" or (row["evictions"] > 0 and row["kl"] > 0), row
