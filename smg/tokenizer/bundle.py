"""The GetTokenizer bundle: a worker's tokenizer files as one ZIP, fetched over gRPC.

The format is the engines' (smg_grpc_servicer/tokenizer_bundle.py): a flat ZIP
(deflated) of the directory's tokenizer and model-config files (`TOKENIZER_FILES` plus
the `*.tiktoken`, `*.jinja`, `*.model` globs), streamed as GetTokenizerChunk messages
of up to 64 KiB; the SHA-256 hex digest of the whole archive's bytes rides on the last
chunk. The gateway checks the digest and unpacks it safely into
`<cache root>/<sha256>/`, reused when already there (the Rust SMG 1.13 does the same
under `<root>/<model>/<sha256>/`, with the same 100 MB / 1000-file caps).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from smg.tokenizer.load import TokenizerLoadError

# The servicer's file list and globs, so the mock sends what a real engine sends.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "tiktoken.model",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)
TOKENIZER_GLOBS: tuple[str, ...] = ("*.tiktoken", "*.jinja", "*.model")
CHUNK_SIZE = 64 * 1024  # the servicer's GetTokenizerChunk size

# The Rust SMG's limits (tokenizer/src/bundle.rs): a large tokenizer.json is ~30 MB.
MAX_EXTRACTED_BYTES = 100 * 1024 * 1024
MAX_FILES = 1000
_HEX = frozenset("0123456789abcdef")


def bundle_cache_root() -> Path:
    """$SMG_TOKENIZER_CACHE, else $XDG_CACHE_HOME/smg/tokenizers, else
    ~/.cache/smg/tokenizers."""
    explicit = os.environ.get("SMG_TOKENIZER_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "smg" / "tokenizers"


def make_bundle(directory: Path) -> tuple[bytes, str]:
    """(zip bytes, sha256 hex) of `directory`'s tokenizer files, as a servicer sends."""
    directory = Path(directory)
    buf = io.BytesIO()
    added: set[str] = set()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in TOKENIZER_FILES:
            path = directory / name
            if path.is_file():
                zf.write(path, name)
                added.add(name)
        for pattern in TOKENIZER_GLOBS:
            for path in sorted(directory.glob(pattern)):
                if path.is_file() and path.name not in added:
                    zf.write(path, path.name)
                    added.add(path.name)
    if not added:
        raise TokenizerLoadError(f"no tokenizer files in {str(directory)!r}")
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def bundle_chunks(data: bytes) -> list[bytes]:
    """The archive split as the servicer streams it (the digest goes on the last)."""
    return [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]


def _safe_member(name: str) -> PurePosixPath:
    """The member's relative path, or TokenizerLoadError for anything that could land
    outside the extraction directory."""
    if not name or "\\" in name or "\x00" in name:
        raise TokenizerLoadError(f"tokenizer bundle: unsafe member name {name!r}")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise TokenizerLoadError(f"tokenizer bundle: unsafe member name {name!r}")
    return p


def unpack_bundle(data: bytes, sha256_hex: str, cache_root: Path) -> Path:
    """Check `data` against `sha256_hex`, unpack it into `cache_root/<sha256>/` and
    return that directory; an existing copy there is reused. Extraction happens in a
    temporary directory beside it and is renamed into place, so a reader never sees a
    half-written bundle and a concurrent unpack of the same bundle is harmless."""
    want = sha256_hex.strip().lower()
    if len(want) != 64 or not set(want) <= _HEX:
        raise TokenizerLoadError(f"tokenizer bundle: bad sha256 {sha256_hex!r}")
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise TokenizerLoadError(f"tokenizer bundle: sha256 mismatch: expected {want}, got {got}")
    cache_root = Path(cache_root)
    final = cache_root / want
    if (final / "tokenizer.json").is_file():
        return final
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{want[:16]}-", dir=cache_root))
    except OSError as exc:
        raise TokenizerLoadError(f"tokenizer cache {str(cache_root)!r}: {exc}") from exc
    try:
        _extract(data, tmp)
        if not (tmp / "tokenizer.json").is_file():
            raise TokenizerLoadError("tokenizer bundle has no tokenizer.json")
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed the same bundle into place first: use theirs.
            if not (final / "tokenizer.json").is_file():
                raise
    except OSError as exc:
        raise TokenizerLoadError(f"tokenizer bundle: cannot unpack: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _extract(data: bytes, dest: Path) -> None:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as exc:
        raise TokenizerLoadError(f"tokenizer bundle is not a zip archive: {exc}") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_FILES:
            raise TokenizerLoadError(
                f"tokenizer bundle has {len(infos)} entries (at most {MAX_FILES})"
            )
        total = 0
        for info in infos:
            rel = _safe_member(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise TokenizerLoadError(f"tokenizer bundle: symlink member {info.filename!r}")
            target = dest.joinpath(*rel.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            # Count the bytes actually inflated, not the header's claim (a zip bomb lies).
            try:
                with zf.open(info) as src, open(target, "xb") as out:
                    while chunk := src.read(1 << 20):
                        total += len(chunk)
                        if total > MAX_EXTRACTED_BYTES:
                            raise TokenizerLoadError(
                                f"tokenizer bundle inflates past {MAX_EXTRACTED_BYTES} bytes"
                            )
                        out.write(chunk)
            except FileExistsError as exc:
                raise TokenizerLoadError(
                    f"tokenizer bundle: duplicate member {info.filename!r}"
                ) from exc
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
                raise TokenizerLoadError(f"tokenizer bundle: corrupt member: {exc}") from exc
            except NotImplementedError as exc:  # an unsupported compression method
                raise TokenizerLoadError(f"tokenizer bundle: {exc}") from exc
