"""smg.tokenizer.bundle: the servicer's ZIP format, checked and safely unpacked."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import zipfile
from pathlib import Path

import pytest

from smg.tokenizer import TokenizerLoadError, load_tokenizer
from smg.tokenizer.bundle import (
    CHUNK_SIZE,
    MAX_EXTRACTED_BYTES,
    MAX_FILES,
    bundle_cache_root,
    bundle_chunks,
    make_bundle,
    unpack_bundle,
)
from tests.tokenizer_data import llama31_dir, needs_llama3


def zip_of(members: dict[str, bytes], *, symlink: str | None = None) -> tuple[bytes, str]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, body in members.items():
            zf.writestr(name, body)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


@needs_llama3
def test_round_trip_loads_the_same_tokenizer(tmp_path: Path) -> None:
    src = llama31_dir(tmp_path / "model")
    (src / "chat_template.jinja").write_text("JINJA")
    (src / "model.safetensors").write_bytes(b"weights are not sent")
    data, sha = make_bundle(src)
    assert sha == hashlib.sha256(data).hexdigest()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        # Flat names, the servicer's order: exact names first, then the globs.
        assert zf.namelist() == [
            "tokenizer.json",
            "tokenizer_config.json",
            "config.json",
            "generation_config.json",
            "chat_template.jinja",
        ]
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist())
    chunks = bundle_chunks(data)
    assert b"".join(chunks) == data and all(len(c) <= CHUNK_SIZE for c in chunks)

    cache = tmp_path / "cache"
    out = unpack_bundle(data, sha.upper(), cache)
    assert out == cache / sha
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert sorted(os.listdir(cache)) == [sha]  # no temporary directory left behind
    tok = load_tokenizer(str(out))
    assert tok.eos_token_ids == (128009, 128001, 128008)
    assert tok.chat_template == "JINJA"

    # A cached copy is reused as it is (not unpacked again).
    marker = out / "marker"
    marker.write_text("kept")
    assert unpack_bundle(data, sha, cache) == out
    assert marker.read_text() == "kept"


def test_sha_mismatch_and_bad_digest(tmp_path: Path) -> None:
    data, sha = zip_of({"tokenizer.json": b"{}"})
    with pytest.raises(TokenizerLoadError, match="sha256 mismatch"):
        unpack_bundle(data, "0" * 64, tmp_path)
    with pytest.raises(TokenizerLoadError, match="sha256 mismatch"):
        unpack_bundle(data + b"x", sha, tmp_path)
    # The digest names a directory: anything but 64 hex digits is refused.
    for bad in ("../../etc", "", sha[:-1], sha + "0", "g" * 64):
        with pytest.raises(TokenizerLoadError, match="bad sha256"):
            unpack_bundle(data, bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name", ["../evil.json", "/abs/tokenizer.json", "a/../../x", "C:evil", "sub\\..\\x"]
)
def test_traversal_rejected(tmp_path: Path, name: str) -> None:
    data, sha = zip_of({"tokenizer.json": b"{}", name: b"owned"})
    with pytest.raises(TokenizerLoadError, match="unsafe member"):
        unpack_bundle(data, sha, tmp_path / "cache")
    assert not (tmp_path / "evil.json").exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_symlink_rejected(tmp_path: Path) -> None:
    data, sha = zip_of({"tokenizer.json": b"{}"}, symlink="link.json")
    with pytest.raises(TokenizerLoadError, match="symlink"):
        unpack_bundle(data, sha, tmp_path)


def test_size_and_count_caps(tmp_path: Path) -> None:
    # Deflate makes 101 MB of zeros ~100 KB: only inflating tells.
    data, sha = zip_of({"tokenizer.json": b"\0" * (MAX_EXTRACTED_BYTES + 1)})
    assert len(data) < 1_000_000
    with pytest.raises(TokenizerLoadError, match="inflates past"):
        unpack_bundle(data, sha, tmp_path)
    many = {f"f{i}.json": b"" for i in range(MAX_FILES)}
    many["tokenizer.json"] = b"{}"
    data, sha = zip_of(many)
    with pytest.raises(TokenizerLoadError, match="entries"):
        unpack_bundle(data, sha, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_not_a_zip_and_no_tokenizer(tmp_path: Path) -> None:
    junk = b"not a zip at all"
    with pytest.raises(TokenizerLoadError, match="not a zip"):
        unpack_bundle(junk, hashlib.sha256(junk).hexdigest(), tmp_path)
    data, sha = zip_of({"config.json": b"{}"})
    with pytest.raises(TokenizerLoadError, match=r"no tokenizer\.json"):
        unpack_bundle(data, sha, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_make_bundle_of_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="no tokenizer files"):
        make_bundle(tmp_path)


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SMG_TOKENIZER_CACHE", str(tmp_path / "explicit"))
    assert bundle_cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("SMG_TOKENIZER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bundle_cache_root() == tmp_path / "xdg" / "smg" / "tokenizers"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert bundle_cache_root() == tmp_path / "home" / ".cache" / "smg" / "tokenizers"
