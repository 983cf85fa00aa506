"""Source files are hashed once per machine; a Hub file's SHA-256 comes from the Hub's metadata.

The signal that a file was (not) read is the kernel's own count of bytes this process read
(``rchar`` in ``/proc/self/io``), not a patched ``open``: hashing an 8 MiB file reads 8 MiB, a
cache hit reads only the small cache file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from huggingface_hub import constants
from huggingface_hub.hf_api import RepoFile  # imported here: an import reads files too

from cosmic_bake import file_hashes
from cosmic_bake.artifacts import source_record
from cosmic_bake.file_hashes import cache_file, file_sha256
from cosmic_bake.model.loading import ModelSource

SIZE = 8 << 20

pytestmark = pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COSMIC_BAKE_MODELS", str(tmp_path / "cache" / "models"))
    monkeypatch.delenv("COSMIC_BAKE_NO_CACHE", raising=False)


def bytes_read() -> int:
    """Bytes this process has read so far, as the kernel counts them."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def reads(fn, *args):
    """``(result, bytes read while calling fn)``."""
    before = bytes_read()
    out = fn(*args)
    return out, bytes_read() - before


def big_file(path: Path, seed: int = 0) -> str:
    data = hashlib.sha256(str(seed).encode()).digest() * (SIZE // 32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_second_hash_of_an_unchanged_file_does_not_read_it(tmp_path):
    f = tmp_path / "model.safetensors"
    want = big_file(f)
    digest, first = reads(file_sha256, f)
    assert digest == want and first >= SIZE
    digest, second = reads(file_sha256, f)
    assert digest == want
    assert second < SIZE // 8, f"the cached hash read {second} bytes"
    assert json.loads(cache_file().read_text())["files"][str(f.resolve())]["sha256"] == want


def test_a_touched_or_rewritten_file_is_hashed_again(tmp_path):
    f = tmp_path / "model.safetensors"
    want = big_file(f)
    file_sha256(f)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touch: same bytes, new mtime
    digest, again = reads(file_sha256, f)
    assert digest == want and again >= SIZE
    changed = big_file(f, seed=1)  # same size, new content, new mtime
    assert changed != want
    digest, again = reads(file_sha256, f)
    assert digest == changed and again >= SIZE


def test_a_corrupt_cache_is_ignored_and_rewritten(tmp_path):
    f = tmp_path / "w.bin"
    want = big_file(f)
    cache_file().parent.mkdir(parents=True, exist_ok=True)
    for junk in ("{not json", json.dumps({"version": 1, "files": []}), json.dumps([1, 2])):
        cache_file().write_text(junk)
        assert file_sha256(f) == want
        assert json.loads(cache_file().read_text())["files"][str(f.resolve())]["sha256"] == want
    data = json.loads(cache_file().read_text())
    data["files"][str(f.resolve())]["sha256"] = "not a digest"
    cache_file().write_text(json.dumps(data))
    assert file_sha256(f) == want


def test_source_record_hashes_each_model_file_once(tmp_path):
    folder = tmp_path / "model"
    want = big_file(folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    source = ModelSource(str(folder), "folder", path=folder)
    rec, first = reads(source_record, source)
    assert rec["files"]["model.safetensors"] == want and first >= SIZE
    again, second = reads(source_record, source)
    assert again == rec and second < SIZE // 8


def test_no_cache_setting_reads_every_time(tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    big_file(f)
    monkeypatch.setenv("COSMIC_BAKE_NO_CACHE", "1")
    file_sha256(f)
    _, again = reads(file_sha256, f)
    assert again >= SIZE


def test_cache_lives_beside_the_builtin_models():
    from cosmic_bake.model.builtin import cache_dir

    assert cache_file() == cache_dir().parent / file_hashes.CACHE_NAME


class HubStandIn:
    """Answers ``get_paths_info`` from local files, as the Hub would (Git LFS metadata), and counts calls."""

    def __init__(self, published: dict[str, tuple[int, str]]) -> None:
        self.published = published  # path in repo -> (size, sha256)
        self.calls: list[tuple] = []

    def get_paths_info(self, repo_id, paths, *, revision=None, repo_type=None, **_):
        self.calls.append((repo_id, tuple(paths), revision, repo_type))
        out = []
        for p in paths:
            size, sha = self.published[p]
            out.append(RepoFile(path=p, size=size, oid="0" * 40, lfs={"size": size, "oid": sha, "pointerSize": 134}))
        return out


def hub_snapshot(tmp_path: Path, name: str = "model.safetensors") -> tuple[Path, str, str]:
    """A Hub cache laid out as huggingface_hub writes it: the snapshot file links to its blob."""
    repo = tmp_path / "hub" / "models--some-org--tiny-model"
    commit = "a" * 40
    blob = repo / "blobs" / "blob"
    want = big_file(blob)
    link = repo / "snapshots" / commit / name
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link, commit, want


def test_hub_file_uses_the_published_sha256_without_reading(tmp_path, monkeypatch):
    link, commit, want = hub_snapshot(tmp_path)
    hub = HubStandIn({"model.safetensors": (SIZE, want)})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(file_hashes, "_hub_api", lambda: hub)
    digest, read = reads(file_sha256, link)
    assert digest == want
    assert read < SIZE // 8, f"the Hub file was read ({read} bytes)"
    assert hub.calls == [("some-org/tiny-model", ("model.safetensors",), commit, "model")]
    file_sha256(link)
    assert len(hub.calls) == 1, "the published hash is cached too"


def test_hub_metadata_that_does_not_match_the_file_is_not_trusted(tmp_path, monkeypatch):
    link, _, want = hub_snapshot(tmp_path)
    hub = HubStandIn({"model.safetensors": (SIZE + 1, "f" * 64)})  # another size: another file
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(file_hashes, "_hub_api", lambda: hub)
    digest, read = reads(file_sha256, link)
    assert digest == want and read >= SIZE


def test_offline_hub_file_is_read(tmp_path, monkeypatch):
    link, _, want = hub_snapshot(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(file_hashes, "_hub_api", lambda: pytest.fail("asked the Hub while offline"))
    digest, read = reads(file_sha256, link)
    assert digest == want and read >= SIZE


def test_hub_location():
    where = file_hashes.hub_location("/c/hub/models--Qwen--Qwen2.5-7B/snapshots/abc/sub/model.safetensors")
    assert where == ("Qwen/Qwen2.5-7B", "abc", "sub/model.safetensors")
    assert file_hashes.hub_location("/models/qwen/model.safetensors") is None
