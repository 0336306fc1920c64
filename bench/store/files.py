"""Atomic, durable file I/O: the store's files and every report's tables and figures.

Every file is written to a temporary name, flushed to disk (file and directory) and renamed into
place, so a reader sees the old file or the new one, never a part. Arrays are .npy without pickle.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from dpmem.privacy.errors import UsageError
from dpmem.privacy.release import VERSION, source_commit

PACKAGES = ("dpmem", "torch", "opacus", "numpy", "scipy", "pandas", "scikit-learn")
TMP_SUFFIX = ".tmp"


# -- atomic, durable primitives ---------------------------------------------------------------

@functools.cache
def current_umask() -> int:
    # Read without changing it where the kernel says it (os.umask can only set it, racing threads).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plainly created file gets (mkstemp's are 0600 whatever the umask)."""
    return 0o666 & ~current_umask()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temporary(name: str) -> bool:
    """Names of the temporaries an atomic write leaves behind when it is killed."""
    return name.startswith(".") and TMP_SUFFIX in name


def atomic_write_bytes(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically and durably; returns its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def atomic_write_json(path: Path, obj) -> str:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def atomic_save_npy(path: Path, array: np.ndarray) -> str:
    return atomic_write_bytes(path, npy_bytes(array))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_npy(path: Path, sha256: str | None = None) -> np.ndarray:
    """Read an array; with ``sha256``, first check the file against it (a damaged file is refused)."""
    try:
        if sha256 is not None and sha256_file(path) != sha256:
            raise UsageError(f"damaged file {path}: its checksum does not match the run's record; "
                             "`dpmem run` with the same config on this directory retrains it")
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"missing file {path}") from None
    except (ValueError, EOFError) as e:
        raise UsageError(f"corrupt file {path}: {e}") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"missing file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"corrupt file {path}: {e}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"corrupt file {path}: expected a JSON object")
    return obj


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def package_versions() -> dict:
    """The versions of dpmem and the libraries its numbers depend on; ``dpmem_commit`` when dpmem
    runs from a git checkout (``+modified`` when tracked files differ from that commit)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["dpmem"] = VERSION   # the code's own version, not an editable install's stale metadata
    commit = source_commit()
    if commit is not None:
        out["dpmem_commit"] = commit
    return out


def remove_temporaries(root: Path) -> list[Path]:
    """Delete what killed atomic writes left under ``root`` (only while holding its lock)."""
    removed = []
    for path in sorted(Path(root).rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        if is_temporary(path.name) and path.exists():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
