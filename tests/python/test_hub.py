"""Hub ids: downloads into the standard Hugging Face cache, cache hits, offline mode, errors, resumed downloads;
and `subfolder=`, in a local folder and in a Hub repository.

A small HTTP server on 127.0.0.1 plays the Hub's file endpoint (`/{repo}/resolve/{revision}/{file}`) with the
headers hf-hub and huggingface_hub read: ETag / X-Linked-Etag, X-Repo-Commit, Content-Length, Content-Range for
`Range` requests, X-Error-Code on 404, and a 302 to a "CDN" URL for large (LFS) files as the Hub sends.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from florence2_rs import AutoProcessor, Florence2Config, Florence2ForConditionalGeneration, _native
from florence2_rs.hub import WEIGHTS, resolve_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY = FIXTURES / "tiny" / "hf"
MSFT = FIXTURES / "release" / "microsoft_Florence-2-base"  # processor files
SUBFOLDER = "checkpoints/final"
COMMIT = hashlib.sha1(b"florence2-rs hub test").hexdigest()
REPO = "org/tiny"
MODEL_FILES = {"files": ("config.json", WEIGHTS), "optional_files": ("generation_config.json",)}
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_CDN = re.compile(r"^/cdn/(?P<repo>[^/]+/[^/]+)/(?P<file>.+)$")


class FakeHub:
    """What the server serves, and what it was asked."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.lfs = {WEIGHTS}  # served through a redirect, like the Hub's LFS files
        self.truncate_once: set[str] = set()  # the next full download of these stops half-way
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.port = 0
        self.commit = COMMIT  # what the X-Repo-Commit headers say

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.requests]


class HubHandler(http.server.BaseHTTPRequestHandler):
    hub: FakeHub
    timeout = 10  # a stuck client cannot hold a server thread for long

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        hub = self.hub
        hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        if m := _CDN.match(self.path):
            data = hub.repos.get(m["repo"], {}).get(m["file"])
            if data is None:
                return self._error(404, "EntryNotFound")
            return self._content(m["repo"], m["file"], data, body)
        m = _RESOLVE.match(self.path)
        if not m or m["repo"] not in hub.repos:
            return self._error(404, "RepoNotFound")
        if m["rev"] not in ("main", COMMIT):
            return self._error(404, "RevisionNotFound")
        data = hub.repos[m["repo"]].get(m["file"])
        if data is None:
            return self._error(404, "EntryNotFound", commit=True)
        if m["file"] in hub.lfs:
            self.send_response(302)
            self.send_header("Location", f"{hub.endpoint}/cdn/{m['repo']}/{m['file']}")
            self.send_header("X-Repo-Commit", self.hub.commit)
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self._content(m["repo"], m["file"], data, body)

    def _content(self, repo: str, name: str, data: bytes, body: bool) -> None:
        start, end = 0, len(data) - 1
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start = int(ranged[1])
            end = min(int(ranged[2]), end) if ranged[2] else end
        part = data[start : end + 1]
        self.send_response(206 if ranged else 200)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", self.hub.commit)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(part)))
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if not body:
            return
        key = f"{repo}/{name}"
        if key in self.hub.truncate_once and len(part) > 1:
            # The connection drops half-way through the body.
            self.hub.truncate_once.discard(key)
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(part)

    def _error(self, code: int, error_code: str, commit: bool = False) -> None:
        self.send_response(code)
        self.send_header("X-Error-Code", error_code)
        self.send_header("X-Error-Message", error_code)
        if commit:
            self.send_header("X-Repo-Commit", self.hub.commit)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hub serving the tiny checkpoint as `org/tiny`, HF_ENDPOINT pointing at it, HF_HOME in tmp."""
    fake = FakeHub()
    fake.repos[REPO] = {p.name: p.read_bytes() for p in TINY.iterdir() if p.is_file()}
    handler = type("Handler", (HubHandler,), {"hub": fake})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    assert len(fake.requests) < 100, "the client should not hammer the server"


def repo_cache(tmp_path: Path) -> Path:
    return tmp_path / "hf_home" / "hub" / "models--org--tiny"


def test_first_download_lands_in_the_standard_layout(hub, tmp_path):
    folder = resolve_checkpoint(REPO, **MODEL_FILES)
    cache = repo_cache(tmp_path)
    assert folder == cache / "snapshots" / COMMIT
    assert (cache / "refs" / "main").read_text().strip() == COMMIT
    for name in ("config.json", WEIGHTS, "generation_config.json"):
        link = folder / name
        assert link.is_symlink(), name  # snapshots link into blobs/, as huggingface_hub lays them out
        assert link.resolve().parent == (cache / "blobs").resolve()
        assert link.read_bytes() == (TINY / name).read_bytes()


def test_cache_hit_makes_no_request(hub):
    first = resolve_checkpoint(REPO, **MODEL_FILES)
    count = len(hub.requests)
    assert resolve_checkpoint(REPO, **MODEL_FILES) == first
    assert len(hub.requests) == count


def test_missing_optional_file_is_skipped_and_remembered(hub, tmp_path):
    del hub.repos[REPO]["generation_config.json"]
    folder = resolve_checkpoint(REPO, **MODEL_FILES)
    assert not (folder / "generation_config.json").exists()
    # Recorded as huggingface_hub does, so that the next load asks nothing.
    assert (repo_cache(tmp_path) / ".no_exist" / COMMIT / "generation_config.json").is_file()
    count = len(hub.requests)
    resolve_checkpoint(REPO, **MODEL_FILES)
    assert len(hub.requests) == count


@pytest.mark.parametrize("how", ["env", "argument"])
def test_offline_mode_uses_only_the_cache(hub, monkeypatch, how):
    def offline(**kwargs):
        if how == "env":
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
            return resolve_checkpoint(REPO, **kwargs)
        return resolve_checkpoint(REPO, local_files_only=True, **kwargs)

    with pytest.raises(FileNotFoundError) as err:
        offline(**MODEL_FILES)
    assert "config.json" in str(err.value) and "org/tiny" in str(err.value)
    assert hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    folder = resolve_checkpoint(REPO, **MODEL_FILES)
    count = len(hub.requests)
    assert offline(**MODEL_FILES) == folder
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        offline(files=("config.json", "tokenizer.json"))
    assert len(hub.requests) == count


def test_missing_file_names_repo_and_file(hub):
    with pytest.raises(FileNotFoundError, match=r"org/tiny.*tokenizer\.json|tokenizer\.json.*org/tiny"):
        resolve_checkpoint(REPO, files=("config.json", "tokenizer.json"))


def test_missing_repo_and_revision(hub):
    with pytest.raises(FileNotFoundError, match="org/absent"):
        resolve_checkpoint("org/absent", files=("config.json",))
    with pytest.raises(FileNotFoundError, match="no revision v9"):
        resolve_checkpoint(REPO, files=("config.json",), revision="v9")


def test_revision_by_commit_hash(hub):
    folder = resolve_checkpoint(REPO, files=("config.json",), revision=COMMIT)
    assert folder.name == COMMIT
    assert any(f"/resolve/{COMMIT}/config.json" in p for p in hub.paths())


def test_pytorch_only_repo_downloads_its_bin(hub, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as load_torch

    files = hub.repos[REPO]
    files.pop(WEIGHTS)
    bin_path = tmp_path / "pytorch_model.bin"
    torch.save(load_torch(str(TINY / WEIGHTS)), bin_path)
    files["pytorch_model.bin"] = bin_path.read_bytes()
    folder = resolve_checkpoint(REPO, **MODEL_FILES)
    assert (folder / "pytorch_model.bin").is_file() and not (folder / WEIGHTS).exists()
    want = Florence2ForConditionalGeneration.from_pretrained(TINY).config.to_dict()
    assert Florence2ForConditionalGeneration.from_pretrained(REPO).config.to_dict() == want


def test_repo_without_weights_names_the_files_it_looked_for(hub):
    hub.repos[REPO].pop(WEIGHTS)
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        resolve_checkpoint(REPO, **MODEL_FILES)


def test_sharded_weights_download_every_shard(hub):
    files = hub.repos[REPO]
    del files[WEIGHTS]
    shards = {"model-00001-of-00002.safetensors": b"shard one", "model-00002-of-00002.safetensors": b"shard two"}
    files.update(shards)
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    files["model.safetensors.index.json"] = repr({"metadata": {}, "weight_map": weight_map}).replace("'", '"').encode()
    folder = resolve_checkpoint(REPO, **MODEL_FILES)
    for name, data in shards.items():
        assert (folder / name).read_bytes() == data
    count = len(hub.requests)
    resolve_checkpoint(REPO, **MODEL_FILES)
    assert len(hub.requests) == count


@pytest.mark.parametrize("stem, ext", [("model", "safetensors"), ("pytorch_model", "bin")])
def test_download_stopped_between_shards_resumes_at_the_missing_shard(hub, stem, ext):
    # The first try records that the repository has no model.safetensors (huggingface_hub's .no_exist marker);
    # that marker must not stand for the weights when the next try finds a shard missing.
    files = hub.repos[REPO]
    del files[WEIGHTS]
    shards = {f"{stem}-00001-of-00002.{ext}": b"shard one" * 10, f"{stem}-00002-of-00002.{ext}": b"shard two" * 10}
    files.update(shards)
    index = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}[ext]
    files[index] = json.dumps({"metadata": {}, "weight_map": dict(zip("ab", shards))}).encode()
    hub.truncate_once.add(f"{REPO}/{stem}-00002-of-00002.{ext}")
    with pytest.raises(OSError, match=f"{stem}-00002-of-00002"):
        resolve_checkpoint(REPO, **MODEL_FILES)
    folder = resolve_checkpoint(REPO, **MODEL_FILES)
    for name, data in shards.items():
        assert (folder / name).read_bytes() == data


def test_interrupted_download_leaves_no_corrupt_file_and_resumes(hub, tmp_path):
    hub.truncate_once.add(f"{REPO}/{WEIGHTS}")
    with pytest.raises(OSError, match=WEIGHTS):
        resolve_checkpoint(REPO, **MODEL_FILES)
    cache = repo_cache(tmp_path)
    assert not (cache / "snapshots" / COMMIT / WEIGHTS).exists()
    expected = (TINY / WEIGHTS).read_bytes()
    sha = hashlib.sha256(expected).hexdigest()
    assert not (cache / "blobs" / sha).exists(), "a partial blob must not look complete"

    folder = resolve_checkpoint(REPO, **MODEL_FILES)
    assert (folder / WEIGHTS).read_bytes() == expected
    # The retry asked only for the rest of the file.
    ranges = [h.get("range") for m, p, h in hub.requests if m == "GET" and p.startswith("/cdn/")]
    assert ranges[-1] not in (None, "bytes=0-", "bytes=0-0")


def test_token_is_sent(hub, monkeypatch):
    resolve_checkpoint(REPO, files=("config.json",), token="hf_argument")
    assert {h.get("authorization") for _, _, h in hub.requests} == {"Bearer hf_argument"}

    hub.requests.clear()
    monkeypatch.setenv("HF_TOKEN", "hf_environment")
    resolve_checkpoint(REPO, files=("config.json",), force_download=True)
    assert {h.get("authorization") for _, _, h in hub.requests} == {"Bearer hf_environment"}

    hub.requests.clear()
    resolve_checkpoint(REPO, files=("config.json",), force_download=True, token=False)
    assert {h.get("authorization") for _, _, h in hub.requests} == {None}


def test_cache_dir_argument(hub, tmp_path):
    folder = resolve_checkpoint(REPO, files=("config.json",), cache_dir=tmp_path / "elsewhere")
    assert folder == tmp_path / "elsewhere" / "models--org--tiny" / "snapshots" / COMMIT


def test_hf_hub_cache_overrides_hf_home(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    folder = resolve_checkpoint(REPO, files=("config.json",))
    assert folder == tmp_path / "hub_cache" / "models--org--tiny" / "snapshots" / COMMIT


@pytest.mark.parametrize("revision", ["../../x", "refs/../../x", "..\\..\\x", "a//b", "C:x"])
def test_revisions_that_leave_the_cache_are_refused_before_any_request(hub, tmp_path, revision):
    """As huggingface_hub refuses a pointer path outside snapshots/: ValueError, from the model and the
    processor alike, even where the path they lead to holds a checkpoint."""
    shutil.copytree(TINY, tmp_path / "hf_home" / "x")
    for load in (resolve_checkpoint, Florence2ForConditionalGeneration.from_pretrained, AutoProcessor.from_pretrained):
        with pytest.raises(ValueError, match="Invalid revision"):
            load(REPO, revision=revision)
    assert hub.requests == []


@pytest.mark.parametrize("commit", ["not-a-hash", "../../../elsewhere"])
def test_a_commit_that_is_no_hash_is_not_used(hub, commit, tmp_path):
    """The server names the commit; an answer that is no commit hash is an OSError, never a snapshot path,
    and nothing is written under the name it gave (hf-hub would write the snapshot link and ref there)."""
    hub.commit = commit
    with pytest.raises(OSError, match="not a commit hash"):
        resolve_checkpoint(REPO, files=("config.json",))
    written = [p for p in tmp_path.rglob("*") if "elsewhere" in p.name or "not-a-hash" in p.name]
    assert written == []


def test_not_a_folder_nor_a_repo_id(hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local folder nor"):
        resolve_checkpoint(str(tmp_path / "no" / "such" / "folder"), files=("config.json",))


def test_shared_with_huggingface_hub(hub, tmp_path):
    """A file huggingface_hub downloaded is used without a request, and ours are found by huggingface_hub."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    cache_dir = tmp_path / "hf_home" / "hub"
    for name in ("config.json", WEIGHTS):
        huggingface_hub.hf_hub_download(REPO, name, cache_dir=cache_dir, endpoint=hub.endpoint)
    hub.requests.clear()
    assert resolve_checkpoint(REPO, files=("config.json", WEIGHTS)).name == COMMIT
    assert hub.requests == []

    resolve_checkpoint(REPO, files=("generation_config.json",))
    path = huggingface_hub.hf_hub_download(REPO, "generation_config.json", cache_dir=cache_dir, local_files_only=True)
    assert Path(path).read_bytes() == (TINY / "generation_config.json").read_bytes()


def test_from_pretrained_end_to_end(hub):
    from florence2_rs import Florence2ForConditionalGeneration

    model = Florence2ForConditionalGeneration.from_pretrained(REPO)
    assert model.config.to_dict()["vision_config"]
    count = len(hub.requests)
    Florence2ForConditionalGeneration.from_pretrained(REPO, local_files_only=True)
    assert len(hub.requests) == count


def logits(model) -> np.ndarray:
    ref = load_file(str(FIXTURES / "tiny" / "reference.safetensors"))
    return model(input_ids=ref["input_ids"], pixel_values=ref["pixel_values"], attention_mask=ref["attention_mask"],
                 decoder_input_ids=ref["decoder_input_ids"]).logits


def input_ids(processor) -> np.ndarray:
    image = Image.new("RGB", (32, 24), (90, 160, 30))  # Microsoft's processor call requires an image
    return processor(text="<OD>", images=image, return_tensors="np")["input_ids"]


@pytest.fixture
def nested(hub):
    """The fake Hub's repository with the checkpoint under SUBFOLDER and Microsoft's processor files under
    `processor/`, nothing at the top."""
    files = {f"{SUBFOLDER}/{name}": data for name, data in hub.repos[REPO].items()}
    files.update({f"processor/{p.name}": p.read_bytes() for p in MSFT.iterdir()})
    hub.repos[REPO] = files
    hub.lfs.add(f"{SUBFOLDER}/{WEIGHTS}")
    return hub


def test_subfolder_files_are_those_below_it_in_the_repository(nested, tmp_path):
    folder = resolve_checkpoint(REPO, subfolder=SUBFOLDER, **MODEL_FILES)
    assert folder == repo_cache(tmp_path) / "snapshots" / COMMIT / "checkpoints" / "final"
    for name in ("config.json", WEIGHTS, "generation_config.json"):
        assert (folder / name).read_bytes() == (TINY / name).read_bytes()
    asked = [p for p in nested.paths() if "/resolve/" in p]
    assert asked and all(f"/resolve/main/{SUBFOLDER}/" in p for p in asked)
    count = len(nested.requests)
    assert resolve_checkpoint(REPO, subfolder=SUBFOLDER + "/", **MODEL_FILES) == folder
    assert resolve_checkpoint(REPO, subfolder=SUBFOLDER, local_files_only=True, **MODEL_FILES) == folder
    assert len(nested.requests) == count
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_checkpoint(REPO, **MODEL_FILES)  # the top of the repository has no checkpoint


def test_hub_subfolder_loads_the_model_and_processor_it_holds(nested):
    model = Florence2ForConditionalGeneration.from_pretrained(REPO, subfolder=SUBFOLDER)
    np.testing.assert_array_equal(logits(model), logits(Florence2ForConditionalGeneration.from_pretrained(TINY)))
    assert Florence2Config.from_pretrained(REPO, subfolder=SUBFOLDER) == Florence2Config.from_pretrained(TINY)
    processor = AutoProcessor.from_pretrained(REPO, subfolder="processor")
    np.testing.assert_array_equal(input_ids(processor), input_ids(AutoProcessor.from_pretrained(MSFT)))


def test_sharded_weights_in_a_subfolder_are_named_from_the_index(nested):
    files = nested.repos[REPO]
    del files[f"{SUBFOLDER}/{WEIGHTS}"]
    shards = {"model-00001-of-00002.safetensors": b"shard one", "model-00002-of-00002.safetensors": b"shard two"}
    files.update({f"{SUBFOLDER}/{name}": data for name, data in shards.items()})
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    files[f"{SUBFOLDER}/model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    folder = resolve_checkpoint(REPO, subfolder=SUBFOLDER, **MODEL_FILES)
    for name, data in shards.items():
        assert (folder / name).read_bytes() == data
    count = len(nested.requests)
    assert resolve_checkpoint(REPO, subfolder=SUBFOLDER, local_files_only=True, **MODEL_FILES) == folder
    assert len(nested.requests) == count


def _weights_below(files: dict[str, bytes], kind: str, folder: str) -> dict[str, bytes]:
    """Puts weights of `kind` under `folder` of a fake repository in place of model.safetensors; returns the
    weight files the download must bring, by their name in `folder`."""
    del files[f"{folder}/{WEIGHTS}"]
    stem, ext = ("model", "safetensors") if "safetensors" in kind else ("pytorch_model", "bin")
    if "shards" in kind:
        weights = {f"{stem}-0000{i}-of-00002.{ext}": f"shard {i}".encode() * 10 for i in (1, 2)}
        index = {"metadata": {}, "weight_map": dict(zip("ab", weights))}
        weights[f"{stem}.{ext}.index.json"] = json.dumps(index).encode()
    else:
        weights = {f"{stem}.{ext}": b"weights" * 10}
    files.update({f"{folder}/{name}": data for name, data in weights.items()})
    return weights


@pytest.mark.parametrize("kind", ["safetensors shards", "bin", "bin shards"])
def test_one_native_call_resolves_the_weights_of_a_subfolder(nested, tmp_path, kind):
    """The native resolver takes the subfolder: model.safetensors, else its index and shards, else
    pytorch_model.bin, else its index and shards, each below the subfolder, as at the repository's top."""
    weights = _weights_below(nested.repos[REPO], kind, SUBFOLDER)
    folder = _native.hub_download(REPO, ["config.json", WEIGHTS], ["generation_config.json"], subfolder=SUBFOLDER)
    assert folder == repo_cache(tmp_path) / "snapshots" / COMMIT / "checkpoints" / "final"
    for name, data in weights.items():
        assert (folder / name).read_bytes() == data
    assert (folder / "config.json").read_bytes() == (TINY / "config.json").read_bytes()
    asked = [p for p in nested.paths() if "/resolve/" in p]
    assert all(f"/{SUBFOLDER}/" in p for p in asked)
    count = len(nested.requests)
    assert resolve_checkpoint(REPO, subfolder=SUBFOLDER, local_files_only=True, **MODEL_FILES) == folder
    assert len(nested.requests) == count


def test_pytorch_shards_in_a_subfolder_resume_at_the_missing_shard(nested):
    weights = _weights_below(nested.repos[REPO], "bin shards", SUBFOLDER)
    nested.truncate_once.add(f"{REPO}/{SUBFOLDER}/pytorch_model-00002-of-00002.bin")
    with pytest.raises(OSError, match=f"{SUBFOLDER}/pytorch_model-00002-of-00002"):
        resolve_checkpoint(REPO, subfolder=SUBFOLDER, **MODEL_FILES)
    folder = resolve_checkpoint(REPO, subfolder=SUBFOLDER, **MODEL_FILES)
    for name, data in weights.items():
        assert (folder / name).read_bytes() == data


def test_subfolder_without_weights_names_both_files(nested):
    del nested.repos[REPO][f"{SUBFOLDER}/{WEIGHTS}"]
    with pytest.raises(FileNotFoundError, match=f"none of {SUBFOLDER}/model.safetensors, {SUBFOLDER}/model"):
        resolve_checkpoint(REPO, subfolder=SUBFOLDER, **MODEL_FILES)


def test_local_subfolder_is_read_from_the_folder_below(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(TINY, root / SUBFOLDER)
    shutil.copytree(MSFT, root / "processor")
    model = Florence2ForConditionalGeneration.from_pretrained(root, subfolder=SUBFOLDER)
    np.testing.assert_array_equal(logits(model), logits(Florence2ForConditionalGeneration.from_pretrained(TINY)))
    processor = AutoProcessor.from_pretrained(root, subfolder="processor")
    np.testing.assert_array_equal(input_ids(processor), input_ids(AutoProcessor.from_pretrained(MSFT)))
    for same in ("", None, "."):
        assert resolve_checkpoint(root / SUBFOLDER, files=("config.json",), subfolder=same) == root / SUBFOLDER
    with pytest.raises(OSError, match="has no subfolder checkpoints/other"):
        Florence2ForConditionalGeneration.from_pretrained(root, subfolder="checkpoints/other")


@pytest.mark.parametrize("subfolder", ["..", "../x", "a/../../x", "/tmp", "a\\..\\x", "C:x", "a\0b"])
def test_subfolders_that_leave_the_checkpoint_are_refused(hub, tmp_path, subfolder):
    """ValueError, from the model and the processor, for a local folder and a Hub id alike, before any
    request and even where the path leads to a checkpoint."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(TINY, tmp_path / "x")
    loads = (resolve_checkpoint, Florence2ForConditionalGeneration.from_pretrained, AutoProcessor.from_pretrained)
    for load in loads:
        for source in (REPO, root):
            with pytest.raises(ValueError, match="Invalid subfolder"):
                load(source, subfolder=subfolder)
    assert hub.requests == []


def test_subfolder_that_is_no_string_is_a_type_error(hub):
    with pytest.raises(TypeError, match="subfolder must be a string, not int"):
        Florence2ForConditionalGeneration.from_pretrained(REPO, subfolder=3)
    assert hub.requests == []


def test_adapter_repo_loads_over_its_base_repo(hub, tmp_path):
    """An adapter-only Hub repository: from_pretrained finds its base through base_model_name_or_path."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import Florence2ForConditionalGeneration as HFModel

    torch.manual_seed(0)
    base = HFModel.from_pretrained(TINY, dtype=torch.float32)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    peft.get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = REPO
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    hub.repos["org/adapter"] = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}

    from_hub = Florence2ForConditionalGeneration.from_pretrained("org/adapter", dtype="float32")
    local = Florence2ForConditionalGeneration.from_pretrained(TINY, dtype="float32")
    local.load_adapter(tmp_path / "adapter")
    ref = load_file(str(TINY.parent / "reference.safetensors"))
    inputs = {key: ref[key] for key in ("input_ids", "attention_mask", "pixel_values", "decoder_input_ids")}
    np.testing.assert_array_equal(from_hub(**inputs).logits, local(**inputs).logits)
    assert from_hub.active_adapters() == ["default"]
