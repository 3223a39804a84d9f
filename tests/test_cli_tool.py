"""The `openclaw` commands as one tool: shared options with one name and default, the model given the same way
everywhere, --version, prompts from stdin, bad arguments refused in one line before anything slow, `plan` on what the
loader loads, and the eviction figures of `run`'s stats line."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import typer.main
from openclaw.models import FAMILIES
from test_cli import tiny_dir
from typer.testing import CliRunner

from openclaw.cli import app, eviction_summary
from openclaw.config import EvictionConfig
from openclaw.errors import OpenClawError
from openclaw.weights.hub import MODEL_TYPES

# Options whose default differs between commands on purpose: (option, command) -> why
DIFFERENT = {
    ("--protect-recent", "eval fidelity"): "the evals compare policies at budgets down to 128 (docs/triattention.md)",
    ("--protect-recent", "eval needle"): "as eval fidelity",
    ("--budgets", "eval needle"): "a budget sweep of its own",
    ("--kv-budget", "plan"): "None plans full attention; a budget asks how many sequences of it fit",
    ("--kv-budget", "models"): "the budget of the 'evicting' column",
    ("--max-seqs", "bench"): "None: the largest --batch-sizes",
}


def commands(cmd=None, path=()):
    cmd = cmd or typer.main.get_command(app)
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from commands(sub, (*path, name))
    else:
        yield " ".join(path), cmd


def test_shared_options_have_one_name_and_one_default():
    seen: dict[str, tuple[str, object, str]] = {}  # option flag -> (its other flags, default, first command)
    model_commands = []
    for name, cmd in commands():
        for p in cmd.params:
            if p.param_type_name == "argument":
                assert p.metavar in ("[MODEL]", "MODEL", "[MODEL] PROMPT"), (name, p.metavar)
                continue
            if "--model" in p.opts:
                model_commands.append(name)
                assert p.opts == ["--model", "-m"] and p.default is None, name  # None: positional, else the default
            if (p.opts[0], name) in DIFFERENT:
                continue
            flags = (tuple(sorted(p.opts + p.secondary_opts)), p.default)
            first = seen.setdefault(p.opts[0], (*flags, name))
            assert flags == first[:2], f"{p.opts[0]} of {name}: {flags} but {first[2]} has {first[:2]}"
    assert {"run", "chat", "serve", "plan", "bench", "calibrate", "eval fidelity", "eval needle"} <= set(model_commands)
    assert seen["--dtype"][1] == "auto" and seen["--max-tokens"][1] == 4096 and seen["--threads"][1] is None
    assert "--repetition-penalty" in {o for _, c in commands() if _ == "chat" for p in c.params for o in p.opts}


def test_the_hub_knows_the_families_without_importing_them():
    assert MODEL_TYPES == set(FAMILIES)


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, result.exception


def test_version_and_argument_errors_come_before_loading(tmp_path):
    result, _ = invoke("--version")
    assert result.exit_code == 0 and re.fullmatch(r"openclaw \d+\.\d+\.\d+\S*\n", result.stdout)
    (tmp_path / "p.txt").write_text("hi")
    for args, needle in [
        (["What is the capital of France?"], "or - to read stdin: echo 'a question' | openclaw run -"),
        ([tmp_path], "is a directory"),
        ([tmp_path / "p.txt", "--out", tmp_path / "o.jsonl"], "--out is where --jsonl writes"),
        (["a", "b", "c"], "takes [MODEL] PROMPT"),
        (["Qwen3-8B", tmp_path / "p.txt", "--model", "Qwen3-32B"], "two models given"),
        ([tmp_path / "p.txt", "--threads", "0"], "--threads 0 must be >= 1"),
        ([], "give a PROMPT file (or - for stdin)"),
        ([tmp_path / "p.txt", "--raw", "--system", "Be brief."], "need the chat template"),
    ]:
        _, e = invoke("run", *args, "--cache-dir", tmp_path)
        assert isinstance(e, OpenClawError) and needle in str(e), (args, e)
    _, e = invoke("chat", "Qwen3-8B", "--model", "Qwen3-32B", "--cache-dir", tmp_path)
    assert isinstance(e, OpenClawError) and "two models given" in str(e)


@pytest.mark.parametrize("args", [["run", "p.txt", "--model", "Qwen3-23B"], ["plan", "Qwen3-23B", "--vram", "24"],
                                  ["models"]])
def test_names_and_listings_do_not_wait_for_torch(tmp_path, args):
    """An unknown name took 7 s and `openclaw models` 8-10 s on a busy machine: importing torch, for nothing."""
    code = ("import sys; sys.argv = ['openclaw', *sys.argv[1:]]; from openclaw.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch imported' if 'torch' in sys.modules else '')")
    (tmp_path / "p.txt").write_text("hi")
    r = subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env={"OPENCLAW_CACHE": str(tmp_path), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    if args[0] != "models":
        assert "unknown model 'Qwen3-23B'" in r.stderr, r.stderr
    else:
        assert "Qwen3-32B" in r.stdout, r.stdout
    if shutil.which("nvidia-smi") is None:  # with a GPU, `models` asks torch for its size
        assert "torch imported" not in r.stdout


def test_eviction_summary_counts_evictions_and_kept_entries():
    streaming = EvictionConfig(policy="streaming", budget=64, protect_recent=8)
    assert eviction_summary(EvictionConfig(policy="full"), 0, 100, 100) == ""
    assert eviction_summary(EvictionConfig(), 0, 100, 100) == ""  # auto, still within its range: full attention
    assert eviction_summary(EvictionConfig(), 2, 90, 400) == "; KV: 2 evictions (auto), 90 of 400 tokens kept"
    assert eviction_summary(streaming, 3, 70, 500) == "; KV: 3 evictions (streaming), 70 of 500 tokens kept"
    assert eviction_summary(streaming, 1, 64, 200) == "; KV: 1 eviction (streaming), 64 of 200 tokens kept"
    assert eviction_summary(streaming, 0, 40, 40) == "; KV: no eviction needed (streaming, budget 64), 40 of 40 tokens kept"


@pytest.fixture
def plain_model(tmp_path, smol_model_dir):
    """A tiny random llama with SmolLM2's tokenizer and no chat template (as a base model has none)."""
    model = tiny_dir(tmp_path / "m", smol_model_dir, vocab_size=49152)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert not (model / "chat_template.jinja").exists()
    return model


def test_run_continues_a_plain_prompt_and_counts_evictions(plain_model, tmp_path):
    """A model without a chat template was refused; with eviction the stats line looked like full attention's."""
    (tmp_path / "p.txt").write_text("Once upon a time")
    args = ["run", plain_model, tmp_path / "p.txt", "--device", "cpu", "--temperature", "0", "--max-tokens", "300",
            "--cache-dir", tmp_path / "cache"]
    result, e = invoke(*args, "--evict", "streaming", "--kv-budget", "64", "--protect-recent", "8")
    assert e is None, result.output
    assert "has no chat template: the prompt is continued as plain text" in result.stderr
    m = re.search(r"(\d+) prompt tokens, (\d+) generated .*; KV: (\d+) evictions? \(streaming\), (\d+) of (\d+) tokens "
                  r"kept", result.stderr)
    assert m, result.stderr
    prompt, generated, evictions, kept, tokens = map(int, m.groups())
    assert tokens == prompt + generated and kept <= 64 + 128 < tokens and evictions >= 1
    result, e = invoke(*args, "--max-tokens", "4")
    assert e is None and "KV:" not in result.stderr  # full attention: nothing to say


@pytest.mark.slow
def test_a_prompt_from_stdin(tmp_path, smol_model_dir):
    def run(text: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "openclaw", "run", "-", "--model", smol_model_dir, "--temperature",
                               "0", "--max-tokens", "16"], check=False, input=text, capture_output=True, text=True,
                              timeout=300, env={"OPENCLAW_CACHE": str(tmp_path), "HOME": str(tmp_path),
                                                "PATH": "/usr/bin:/bin", "COLUMNS": "200"})

    r = run("What is the capital of France?\n")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    r = run("  \n")
    assert r.returncode == 2 and "stdin is empty" in r.stderr and "Traceback" not in r.stderr


def test_plan_plans_what_the_loader_loads_and_refuses_the_rest(tmp_path):
    """GLM-4.7-Flash loads now: its plan counts its MoE weights (it crashed on MLA's single latent KV head); what the
    loader refuses, plan refuses in one line."""
    result, e = invoke("plan", "GLM-4.7-Flash", "--vram", "24", "--cache-dir", tmp_path)
    assert e is None, result.output
    weights = float(re.search(r"weights\s+│\s+([\d.]+) GiB", result.stdout).group(1))
    assert 14 < weights < 18  # ~16.5 GB of 4-bit weights, not the 2.55 GiB of a model it could not load
    layers = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 100, "head_dim": 16, "max_position_embeddings": 256}
    for name, config, needle in [("mamba", {"model_type": "mamba", **layers}, "architecture 'mamba'"),
                                 ("gptq", {"model_type": "qwen3", **layers, "quantization_config": {
                                     "quant_method": "gptq", "bits": 4}}, "'gptq' is not supported")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        _, e = invoke("plan", tmp_path / name, "--vram", "24", "--cache-dir", tmp_path)
        assert isinstance(e, OpenClawError) and needle in str(e) and "\n" not in str(e), e
