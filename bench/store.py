"""The run store: a directory of JSON and .npy files that survives interruption.

Layout (DESIGN.md "Run store and outputs")::

    RUN/config.json                      resolved config, its hash, package versions
    RUN/masks.npy                        bool [K, n_train], shared by every variant
    RUN/data/*.npy                       labels, subgroups and flags of the examples
    RUN/variants/NAME/plan.json          noise multiplier, sample rate, steps, accountant
    RUN/variants/NAME/chunks/A-B/        one finished unit of models A..B-1 (while training)
    RUN/variants/NAME/chunks/A-B.json    its completion record
    RUN/variants/NAME/{split}_{array}.npy  per-model arrays, once every unit is done

Every file is written to a temporary name and renamed into place, and a unit counts as done
only once its completion record exists, so a run killed at any moment resumes where it stopped
and never redoes a finished unit.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from dpmem.bench import config as config_mod
from dpmem.bench.config import Config
from dpmem.bench.errors import UsageError

ARRAYS = ("correct", "margin")
SPLITS = ("train", "test")
DATA_ARRAYS = ("y_train", "g_train", "y_test", "g_test", "subgroup_label", "is_canary", "label_noisy")
PACKAGES = ("dpmem", "torch", "opacus", "numpy", "scipy", "pandas", "scikit-learn")


# -- atomic primitives -----------------------------------------------------------------------

def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    import io
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"missing file {path}") from None
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"corrupt file {path}: {e}") from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"corrupt file {path}: {e}") from None


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# -- the store -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.start:06d}-{self.stop:06d}"

    @property
    def size(self) -> int:
        return self.stop - self.start


def chunks_of(models: int, chunk_size: int) -> list[Chunk]:
    return [Chunk(s, min(s + chunk_size, models)) for s in range(0, models, chunk_size)]


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, root: str | Path, cfg: Config) -> "RunStore":
        """Open RUN for ``cfg``: new, or the same config resumed. A different config is refused."""
        store = cls(root)
        cfg_path = store.root / "config.json"
        if cfg_path.exists():
            stored = read_json(cfg_path)
            if stored.get("hash") != cfg.hash():
                raise UsageError(
                    f"{store.root} holds a run with a different config (hash {stored.get('hash')} vs "
                    f"{cfg.hash()}); use another --out or the same settings to resume it")
            return store
        if store.root.exists() and any(store.root.iterdir()):
            raise UsageError(f"{store.root} exists, is not empty and is not a dpmem run directory")
        store.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cfg_path, {"config": cfg.to_dict(), "hash": cfg.hash(),
                                     "versions": package_versions()})
        return store

    @classmethod
    def open(cls, root: str | Path) -> "RunStore":
        """Open an existing run for reading; a missing or corrupt directory is a UsageError."""
        store = cls(root)
        if not store.root.is_dir():
            raise UsageError(f"run directory not found: {store.root}")
        if not (store.root / "config.json").is_file():
            raise UsageError(f"not a dpmem run directory (no config.json): {store.root}")
        store.config()  # validates
        return store

    def config(self) -> Config:
        raw = read_json(self.root / "config.json")
        if "config" not in raw or not isinstance(raw["config"], dict):
            raise UsageError(f"corrupt file {self.root / 'config.json'}: no 'config' table")
        return config_mod.from_dict(raw["config"])

    def meta(self) -> dict:
        return read_json(self.root / "config.json")

    # -- run-level arrays ----------------------------------------------------------------
    def save_masks(self, masks: np.ndarray) -> None:
        atomic_save_npy(self.root / "masks.npy", masks.astype(bool))

    def masks(self) -> np.ndarray | None:
        path = self.root / "masks.npy"
        return load_npy(path) if path.exists() else None

    def save_data(self, arrays: dict[str, np.ndarray]) -> None:
        for name in DATA_ARRAYS:
            atomic_save_npy(self.root / "data" / f"{name}.npy", arrays[name])

    def data(self) -> dict[str, np.ndarray]:
        return {name: load_npy(self.root / "data" / f"{name}.npy") for name in DATA_ARRAYS}

    def has_data(self) -> bool:
        return all((self.root / "data" / f"{n}.npy").exists() for n in DATA_ARRAYS)

    # -- variants ------------------------------------------------------------------------
    def variant_dir(self, name: str) -> Path:
        return self.root / "variants" / name

    def save_plan(self, name: str, plan: dict) -> None:
        atomic_write_json(self.variant_dir(name) / "plan.json", plan)

    def plan(self, name: str) -> dict | None:
        path = self.variant_dir(name) / "plan.json"
        return read_json(path) if path.exists() else None

    def _chunk_dir(self, name: str, chunk: Chunk) -> Path:
        return self.variant_dir(name) / "chunks" / chunk.name

    def _chunk_record(self, name: str, chunk: Chunk) -> Path:
        return self.variant_dir(name) / "chunks" / f"{chunk.name}.json"

    def chunk_done(self, name: str, chunk: Chunk) -> bool:
        return self.variant_complete(name) or (
            self._chunk_record(name, chunk).exists() and self._chunk_dir(name, chunk).is_dir())

    def write_chunk(self, name: str, chunk: Chunk, arrays: dict[str, np.ndarray], record: dict) -> None:
        """Store one finished unit: arrays into a temporary directory renamed into place, then the record."""
        final = self._chunk_dir(name, chunk)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{chunk.name}."))
        digest = hashlib.sha256()
        for key in sorted(arrays):
            np.save(tmp / f"{key}.npy", np.ascontiguousarray(arrays[key]), allow_pickle=False)
            digest.update((tmp / f"{key}.npy").read_bytes())
        if final.exists():  # a unit written but not recorded before a crash: redo it
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_json(self._chunk_record(name, chunk), {**record, "sha256": digest.hexdigest(),
                                                             "start": chunk.start, "stop": chunk.stop})

    def finalize_variant(self, name: str, chunks: list[Chunk]) -> None:
        """Concatenate the units into one [K, m] array per split, then drop the units."""
        vdir = self.variant_dir(name)
        keys = sorted(p.stem for p in self._chunk_dir(name, chunks[0]).glob("*.npy"))
        records = [read_json(self._chunk_record(name, c)) for c in chunks]
        for key in keys:
            atomic_save_npy(vdir / f"{key}.npy",
                            np.concatenate([load_npy(self._chunk_dir(name, c) / f"{key}.npy") for c in chunks]))
        seconds = float(sum(r.get("seconds", 0.0) for r in records))
        atomic_write_json(vdir / "complete.json", {"models": chunks[-1].stop, "units": len(chunks),
                                                   "arrays": keys, "train_seconds": seconds})
        shutil.rmtree(vdir / "chunks", ignore_errors=True)

    def variant_complete(self, name: str) -> bool:
        return (self.variant_dir(name) / "complete.json").exists()

    def variant_arrays(self, name: str) -> dict[str, np.ndarray]:
        """Per-model arrays of a finished variant: {'train_correct': bool[K, n], ...}."""
        vdir = self.variant_dir(name)
        if not self.variant_complete(name):
            raise UsageError(f"variant {name!r} in {self.root} is not complete; run `dpmem run` again to finish it")
        done = read_json(vdir / "complete.json")
        return {key: load_npy(vdir / f"{key}.npy") for key in done["arrays"]}

    def variant_record(self, name: str) -> dict:
        return read_json(self.variant_dir(name) / "complete.json")
