"""`openclaw pull` against a local fake of the Hugging Face Hub's HTTP API (a real server on loopback), so the
real huggingface_hub client lists, streams and resumes; plus offline, disk-full and verification failures."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from openclaw.errors import OpenClawError
from openclaw.weights.download import MARKER, pull
from openclaw.weights.hub import list_models, load_manifest

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "Qwen/Qwen3-0.6B"


class FakeHub(ThreadingHTTPServer):
    """Serves repos {repo: {filename: bytes}} the way the hub does: model_info JSON and /resolve/ with Ranges.
    lie[filename] = bytes served instead of the real content (a corrupted transfer); listed sizes stay true."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repos, self.lie, self.ranges, self.sizes = repos, {}, [], {}
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def info(self, repo: str) -> dict:
        siblings = []
        for name, data in self.repos[repo].items():
            size = self.sizes.get(name, len(data))
            s = {"rfilename": name, "size": size,
                 "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
            if name.endswith(".safetensors"):  # weights are LFS files: the hub lists their sha256
                s["lfs"] = {"size": size, "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(s)
        return {"id": repo, "sha": COMMIT, "siblings": siblings}


class _HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None, head: bool = False):
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head: bool = False):
        hub = self.server
        if m := re.fullmatch(r"/api/models/(.+)/revision/([^/?]+)(\?.*)?", self.path):
            if m.group(1) not in hub.repos:
                return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            return self._send(200, json.dumps(hub.info(m.group(1))).encode(), {"Content-Type": "application/json"})
        m = re.fullmatch(r"/(.+)/resolve/([0-9a-f]{40})/(.+)", self.path)
        if not m or m.group(1) not in hub.repos or m.group(3) not in hub.repos[m.group(1)]:
            return self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"}, head)
        data = hub.lie.get(m.group(3), hub.repos[m.group(1)][m.group(3)])
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        if rng := self.headers.get("Range"):
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            hub.ranges.append((m.group(3), start))
            return self._send(206, data[start:], {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
                              head)
        self._send(200, data, headers, head)


def repo_files(weights: bytes = b"") -> dict[str, bytes]:
    return {"config.json": b'{"model_type": "qwen3"}', "tokenizer.json": b'{"model": {}}',
            "model.safetensors": weights or os.urandom(3_000_000), "README.md": b"# not fetched",
            "original/params.json": b"{}"}


@pytest.fixture
def hub():
    server = FakeHub({REPO: repo_files()})
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def entry():
    return load_manifest()["Qwen3-0.6B"]


def test_pull_downloads_verifies_and_marks_complete(hub, entry, tmp_path):
    seen = []
    path = pull(entry, tmp_path, lambda what, done, total: seen.append((what, done, total)), endpoint=hub.url)
    assert path == tmp_path / "hub" / REPO
    assert sorted(p.name for p in path.iterdir()) == sorted([MARKER, "config.json", "tokenizer.json",
                                                             "model.safetensors"])
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (path / name).read_bytes() == hub.repos[REPO][name]
    assert ("downloading model.safetensors", 3_000_000, 3_000_000) in seen
    assert any(w == "verifying model.safetensors" for w, _, _ in seen)
    assert [w for w, _, _ in seen if w.startswith("downloading")][-1] == "downloading config.json"  # last
    assert {m["name"]: m["present"] for m in list_models(tmp_path)}["Qwen3-0.6B"]
    seen.clear()
    assert pull(entry, tmp_path, lambda *a: seen.append(a), endpoint=hub.url) == path
    assert seen == []  # everything verified before: nothing fetched or hashed again


def test_pull_resumes_a_partial_file_with_a_range_request(hub, entry, tmp_path):
    data = hub.repos[REPO]["model.safetensors"]
    target = tmp_path / "hub" / REPO
    target.mkdir(parents=True)
    (target / "model.safetensors.part").write_bytes(data[:1_234_567])  # what an interrupted run left
    pull(entry, tmp_path, endpoint=hub.url)
    assert hub.ranges == [("model.safetensors", 1_234_567)]
    assert (target / "model.safetensors").read_bytes() == data and not (target / "model.safetensors.part").exists()


def test_corrupted_transfer_is_deleted_and_reported(hub, entry, tmp_path):
    hub.lie["model.safetensors"] = os.urandom(3_000_000)  # right size, wrong bytes
    with pytest.raises(OpenClawError, match=r"model.safetensors: sha256 [0-9a-f]{64} does not match"):
        pull(entry, tmp_path, endpoint=hub.url)
    target = tmp_path / "hub" / REPO
    assert not (target / "model.safetensors").exists() and not (target / "model.safetensors.part").exists()
    assert not (target / "config.json").exists()  # the model never looks complete
    del hub.lie["model.safetensors"]
    pull(entry, tmp_path, endpoint=hub.url)  # a retry completes it
    assert (target / "model.safetensors").read_bytes() == hub.repos[REPO]["model.safetensors"]


def test_small_files_are_checked_by_git_blob_id(hub, entry, tmp_path):
    hub.lie["tokenizer.json"] = b'{"model": {"x"}'[:13]  # same length as the real one, other bytes
    assert len(hub.lie["tokenizer.json"]) == len(hub.repos[REPO]["tokenizer.json"])
    with pytest.raises(OpenClawError, match="tokenizer.json: git blob id"):
        pull(entry, tmp_path, endpoint=hub.url)


def test_manifest_pins_sizes_and_hashes(hub, entry, tmp_path):
    data = hub.repos[REPO]["model.safetensors"]
    files = {"config.json": {}, "tokenizer.json": {},
             "model.safetensors": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    pinned = replace(entry, source={**entry.source, "files": files})
    assert pull(pinned, tmp_path, endpoint=hub.url).joinpath("model.safetensors").read_bytes() == data
    wrong = replace(entry, source={**entry.source, "files": {**files, "model.safetensors": {"sha256": "0" * 64}}})
    shutil.rmtree(tmp_path / "hub")
    with pytest.raises(OpenClawError, match="the repo changed; nothing was downloaded"):
        pull(wrong, tmp_path, endpoint=hub.url)
    assert not (tmp_path / "hub" / REPO).exists()


def test_disk_too_small_is_refused_before_downloading(hub, entry, tmp_path):
    hub.sizes["model.safetensors"] = 10**15  # a petabyte of weights
    with pytest.raises(OpenClawError, match=r"needs 1000000\.0 GB more but .* GB free") as e:
        pull(entry, tmp_path, endpoint=hub.url)
    assert "--cache-dir" in str(e.value)
    assert not list((tmp_path / "hub" / REPO).iterdir())


def test_unreachable_hub_and_unknown_repo(hub, entry, tmp_path):
    with pytest.raises(OpenClawError, match="cannot reach the Hugging Face Hub at http://127.0.0.1:9 .*resumes"):
        pull(entry, tmp_path, endpoint="http://127.0.0.1:9")
    other = replace(entry, source={**entry.source, "hub": "nobody/nothing"})
    with pytest.raises(OpenClawError, match="nobody/nothing .*was not found"):
        pull(other, tmp_path, endpoint=hub.url)


def openclaw(*args, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openclaw", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=timeout, env={"PATH": os.environ["PATH"], "COLUMNS": "100", **env})


def test_cli_offline_is_one_line(tmp_path):
    r = openclaw("pull", "Qwen3-0.6B", env={"HOME": str(tmp_path), "OPENCLAW_CACHE": str(tmp_path),
                                            "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [
        "error: cannot download Qwen3-0.6B: HF_HUB_OFFLINE is set; unset it to download"]


@pytest.mark.slow
def test_cli_pull_then_run_by_name(smol_model_dir, tmp_path):
    """A real (tiny, random) checkpoint pulled through the CLI from the fake hub, then run by its manifest name."""
    from tiny_models import make_hf_model

    model = tmp_path / "src"
    make_hf_model("qwen3", model, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol_model_dir / name, model / name)
    server = FakeHub({REPO: {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}})
    env = {"HOME": str(tmp_path), "OPENCLAW_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": server.url}
    try:
        r = openclaw("pull", "Qwen3-0.6B", env=env)
        assert r.returncode == 0, r.stderr
        assert "Qwen3-0.6B is ready in" in r.stderr and "openclaw chat Qwen3-0.6B" in r.stderr
        r = openclaw("models", "--vram", "24", env=env)
        assert re.search(r"Qwen3-0\.6B\s.*\syes\s", r.stdout), r.stdout
        (tmp_path / "q.txt").write_text("Hello")
        r = openclaw("run", tmp_path / "q.txt", "--model", "qwen3-0.6b", "--max-tokens", "4", "--device", "cpu",
                     env=env)
        assert r.returncode == 0, r.stderr
        assert re.search(r"\d+ prompt tokens, 4 generated", r.stderr), r.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_models_refuses_a_vram_that_is_not_positive(tmp_path):
    r = openclaw("models", "--vram", "0", env={"HOME": str(tmp_path), "OPENCLAW_CACHE": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.strip() == "error: --vram 0 GiB must be > 0", r.stderr
