"""The run store: a directory of JSON and .npy files that survives interruption, power cuts and
a second writer.

Layout (bench/README.md, "Output files")::

    RUN/config.json                      format, resolved config, its hash, data fingerprint, versions
    RUN/.lock                            held by the one process that writes the directory
    RUN/masks.npy                        bool [K, n_train], shared by every variant
    RUN/data/*.npy                       labels, subgroups and flags of the examples
    RUN/arrays.json                      sha256 of masks.npy and data/*.npy
    RUN/variants/NAME/plan.json          noise multiplier, sample rate, steps, accountant
    RUN/variants/NAME/units/A-B/        one finished unit of models A..B-1 (while training)
    RUN/variants/NAME/units/A-B.json    its completion record, with each array's sha256
    RUN/variants/NAME/{split}_{array}.npy  per-model arrays, once every unit is done
    RUN/variants/NAME/complete.json      the variant's completion record, with each array's sha256

Every file is written to a temporary name, flushed to disk (file and directory) and renamed into
place, and a record is written only after the files it names are durable. A unit counts as done
only once its record exists and its files match the record's checksums, so a run killed at any
moment resumes where it stopped, never redoes a finished unit and never uses a damaged one.
Units may have any size: a resume with another ``unit_size`` keeps the finished units and splits
what is left (every split gives the same arrays, see pipeline.py).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpmem.bench import config as config_mod
from dpmem.bench.config import STORE_FORMAT, Config
from dpmem.bench.data.fingerprint import array_fingerprint
from dpmem.bench.store.files import (
    TMP_SUFFIX,
    atomic_save_npy,
    atomic_write_json,
    current_umask,
    file_mode,
    fsync_dir,
    is_temporary,
    load_npy,
    npy_bytes,
    package_versions,
    read_json,
    remove_temporaries,
    sha256_file,
)
from dpmem.privacy.errors import UsageError

CANARY_MASKS_FILE = "canary_masks.npy"   # the gradient canaries' memberships, beside masks.npy
DATA_ARRAYS = ("y_train", "g_train", "y_test", "g_test", "subgroup_label", "is_canary", "label_noisy")
# The arrays a run's data fingerprint covers.
FINGERPRINTED = ("x_train", "y_train", "x_test", "y_test")
LOCK_NAME = ".lock"
# How long a second writer waits for the lock before it gives up with a clear message.
LOCK_WAIT_S = 5.0
_UNIT = re.compile(r"^(\d{6,})-(\d{6,})$")


def data_fingerprint(ds) -> dict[str, str]:
    """Fingerprint of a dataset's training and test arrays (inputs and labels)."""
    return {name: array_fingerprint(getattr(ds, name)) for name in FINGERPRINTED}


# -- the store -------------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class ModelRange:
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.start:06d}-{self.stop:06d}"

    @property
    def size(self) -> int:
        return self.stop - self.start


def split_models(models: int, unit_size: int, start: int = 0) -> list[ModelRange]:
    return [ModelRange(s, min(s + unit_size, models)) for s in range(start, models, unit_size)]


def fill_gaps(models: int, unit_size: int, done: list[ModelRange]) -> list[ModelRange]:
    """Units of at most ``unit_size`` models covering what ``done`` (disjoint, sorted) leaves of [0, models)."""
    todo, at = [], 0
    for unit in done + [ModelRange(models, models)]:
        todo += split_models(unit.start, unit_size, start=at)
        at = unit.stop
    return todo


class StoreBusy(UsageError):
    """Another process holds the run directory's lock."""


class _DirectoryLock:
    """An exclusive flock on a run directory's own descriptor, held per process and counted (the
    ``.lock`` file's filelock is reentrant in a process too). A second process waits for it however
    the directory's entries change; the kernel drops it when the holder's process ends."""

    _held: dict[tuple[int, int], list[int]] = {}   # (st_dev, st_ino) -> [descriptor, holds]
    _mutex = threading.Lock()
    POLL_S = 0.05

    @classmethod
    def _key(cls, root: Path) -> tuple[int, int]:
        st = os.stat(root)
        return st.st_dev, st.st_ino

    @classmethod
    def acquire(cls, root: Path, timeout: float) -> tuple[int, int]:
        """Hold the lock of ``root`` (waiting up to ``timeout`` seconds); returns the key to release."""
        key = cls._key(root)
        with cls._mutex:
            if key in cls._held:
                cls._held[key][1] += 1
                return key
        try:
            import fcntl
        except ImportError:   # no flock (Windows): the .lock file's lock alone
            with cls._mutex:
                cls._held[key] = [-1, 1]
            return key
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreBusy(f"{root} is being written by another dpmem process (its directory is locked); "
                                    "wait for it to finish or use another --out") from None
                time.sleep(cls.POLL_S)
        with cls._mutex:
            cls._held[key] = [fd, 1]
        return key

    @classmethod
    def release(cls, key: tuple[int, int]) -> None:
        with cls._mutex:
            entry = cls._held.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del cls._held[key]
                if entry[0] >= 0:
                    os.close(entry[0])   # closing the last descriptor releases the flock


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock: Any = None   # a filelock.FileLock once acquired
        self._dir_locks: list[tuple[int, int]] = []   # this store's holds of _DirectoryLock

    # -- the writer's lock -----------------------------------------------------------------
    def acquire(self, wait: float | None = None) -> RunStore:
        """Become the directory's one writer (waiting up to ``wait`` seconds), or raise StoreBusy.

        Two OS locks, both released with a killed holder's process: the ``.lock`` file (filelock),
        and a flock on the run directory's own descriptor, which deleting ``.lock`` cannot defeat."""
        from filelock import FileLock, Timeout
        if self._lock is None:
            self._lock = FileLock(self.root / LOCK_NAME, is_singleton=True, thread_local=False, mode=file_mode())
        timeout = LOCK_WAIT_S if wait is None else wait
        busy = StoreBusy(f"{self.root} is being written by another dpmem process (lock {self.root / LOCK_NAME}); "
                         "wait for it to finish or use another --out")
        deadline = time.monotonic() + timeout
        try:
            self._lock.acquire(timeout=timeout)
        except Timeout:
            raise busy from None
        try:
            self._dir_locks.append(_DirectoryLock.acquire(self.root, max(0.0, deadline - time.monotonic())))
        except BaseException:
            self._lock.release()
            raise
        return self

    def release(self) -> None:
        """Give up one hold of the lock (``acquire`` calls nest)."""
        if self._dir_locks:
            _DirectoryLock.release(self._dir_locks.pop())
        if self._lock is not None and self._lock.is_locked:
            self._lock.release()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, root: str | Path, cfg: Config, *, fingerprint: dict | None = None) -> RunStore:
        """Open RUN for writing ``cfg`` (new, or the same run resumed) and hold its lock.

        A different config, other data, a run of an older store format or a directory that is
        not a run is refused. A directory killed while being created (nothing in it but the lock
        and temporaries) is taken over."""
        store = cls(root)
        cfg_path = store.root / "config.json"
        if store.root.exists() and not store.root.is_dir():
            raise UsageError(f"{store.root} is a file, not a run directory")
        if store.root.is_dir() and not cfg_path.exists() and store._foreign_entries():
            raise UsageError(f"{store.root} exists, is not empty and is not a dpmem run directory")
        store.root.mkdir(parents=True, exist_ok=True)
        store.acquire()
        try:
            remove_temporaries(store.root)
            if cfg_path.exists():
                store._check_resumable(cfg, fingerprint)
                return store
            if store._foreign_entries():
                raise UsageError(f"{store.root} exists, is not empty and is not a dpmem run directory")
            atomic_write_json(cfg_path, {"format": STORE_FORMAT, "config": cfg.to_dict(), "hash": cfg.hash(),
                                         "execution": cfg.execution(), "data_fingerprint": fingerprint,
                                         "versions": package_versions()})
            return store
        except BaseException:
            store.release()
            raise

    def _foreign_entries(self) -> list[str]:
        return [p.name for p in self.root.iterdir() if p.name != LOCK_NAME and not is_temporary(p.name)]

    def _check_resumable(self, cfg: Config, fingerprint: dict | None) -> None:
        stored = self.meta()
        self.config()   # a config.json without its config or its hash is refused as such
        if stored.get("format", 1) != STORE_FORMAT:
            raise UsageError(f"{self.root} was written by an older dpmem (store format {stored.get('format', 1)}, "
                             f"seeds drawn per unit): `dpmem report` and `check` read it, but it cannot be resumed; "
                             "use another --out")
        if stored.get("hash") != cfg.hash():
            edited = self._edited_config()
            if edited is not None:
                raise edited
            raise UsageError(
                f"{self.root} holds a run with a different config (hash {stored.get('hash')} vs "
                f"{cfg.hash()}); use another --out or the same settings to resume it")
        if fingerprint is not None:
            self.check_fingerprint(fingerprint, "the dataset built now")

    @classmethod
    def open(cls, root: str | Path) -> RunStore:
        """Open an existing run for reading; a missing or corrupt directory is a UsageError."""
        store = cls(root)
        if not store.root.is_dir():
            raise UsageError(f"run directory not found: {store.root}")
        if not (store.root / "config.json").is_file():
            raise UsageError(f"not a dpmem run directory (no config.json): {store.root}")
        store.config()  # validates
        return store

    def config(self) -> Config:
        raw = self.meta()
        path = self.root / "config.json"
        if "config" not in raw or not isinstance(raw["config"], dict):
            raise UsageError(f"corrupt file {path}: no 'config' table")
        if not isinstance(raw.get("hash"), str):
            raise UsageError(f"corrupt file {path}: no config hash")
        try:
            cfg = config_mod.from_dict(raw["config"])
        except UsageError as e:
            raise UsageError(f"corrupt file {path}: {e}") from None
        return cfg

    def _edited_config(self) -> UsageError | None:
        """The error to raise when config.json's config no longer hashes to its recorded hash (edited
        by hand); None when it does, or for format 1, whose hash covered the execution settings too."""
        raw = self.meta()
        if raw.get("format", 1) < 2 or self.config().hash() == raw["hash"]:
            return None
        return UsageError(f"corrupt file {self.root / 'config.json'}: its config does not match its recorded hash "
                          f"{raw['hash']} (edited by hand?); the run's arrays were made with the recorded config")

    def meta(self) -> dict:
        return read_json(self.root / "config.json")

    @property
    def format(self) -> int:
        """The layout version; a store without config.json (a study's sub-store, e.g. RUN/loo/VARIANT)
        is written by this dpmem."""
        if not (self.root / "config.json").exists():
            return STORE_FORMAT
        return int(self.meta().get("format", 1))

    # -- provenance: the data the run was trained on ---------------------------------------
    def fingerprint(self) -> dict | None:
        return self.meta().get("data_fingerprint")

    def check_fingerprint(self, fingerprint: dict, what: str) -> None:
        """Refuse to mix datasets: ``fingerprint`` (of ``what``) must equal the stored one."""
        stored = self.fingerprint()
        if stored is None:
            return
        for name, digest in fingerprint.items():
            if name in stored and stored[name] != digest:
                raise UsageError(f"{what} differs from the data {self.root} was trained on ({name} fingerprint "
                                 f"{digest[:12]} vs {stored[name][:12]}; a changed package or data file?); "
                                 "use another --out for a new run")

    def record_fingerprint(self, fingerprint: dict) -> None:
        """Store the fingerprint of a run created without one (callers that load the data later)."""
        meta = self.meta()
        if meta.get("data_fingerprint") is None:
            meta["data_fingerprint"] = fingerprint
            atomic_write_json(self.root / "config.json", meta)

    # -- run-level arrays ----------------------------------------------------------------
    def _array_record(self) -> dict:
        path = self.root / "arrays.json"
        return read_json(path).get("sha256", {}) if path.exists() else {}

    def _checked(self, rel: str) -> str | None:
        """The recorded sha256 of a run-level array; None for old runs, which recorded none."""
        if self.format < 2:
            return None
        digest = self._array_record().get(rel)
        if digest is None:
            raise UsageError(f"{self.root / rel} is not recorded as complete; run `dpmem run` again to finish the run")
        return digest

    def save_run_arrays(self, masks: np.ndarray, data: dict[str, np.ndarray]) -> None:
        """Masks and data arrays, then the record of their checksums."""
        sums = {"masks.npy": atomic_save_npy(self.root / "masks.npy", masks.astype(bool))}
        for name in DATA_ARRAYS:
            sums[f"data/{name}.npy"] = atomic_save_npy(self.root / "data" / f"{name}.npy", data[name])
        atomic_write_json(self.root / "arrays.json", {"sha256": sums})

    def save_canary_masks(self, masks: np.ndarray) -> None:
        """The gradient canaries' memberships, then their checksum beside the run's other arrays."""
        digest = atomic_save_npy(self.root / CANARY_MASKS_FILE, masks.astype(bool))
        atomic_write_json(self.root / "arrays.json", {"sha256": {**self._array_record(), CANARY_MASKS_FILE: digest}})

    def canary_masks(self, *, repairable: bool = False) -> np.ndarray | None:
        """The stored canary memberships checked against their record (None when the run has none).
        ``repairable``: None also for a file that is unrecorded or damaged, so that the caller
        makes it again; otherwise such a file is refused with exit 2."""
        path = self.root / CANARY_MASKS_FILE
        if not path.exists():
            return None
        if repairable:
            digest = self._array_record().get(CANARY_MASKS_FILE)
            return load_npy(path) if digest is not None and sha256_file(path) == digest else None
        return load_npy(path, self._checked(CANARY_MASKS_FILE))

    def run_arrays_intact(self) -> bool:
        """Masks and data stored and matching their record (False: write them again)."""
        record = self._array_record()
        names = ["masks.npy"] + [f"data/{n}.npy" for n in DATA_ARRAYS]
        try:
            return all(name in record and sha256_file(self.root / name) == record[name] for name in names)
        except OSError:
            return False

    def masks(self) -> np.ndarray:
        """The run's subset masks, bool [models, n_train]."""
        path = self.root / "masks.npy"
        if not path.exists() and self.format < 2:
            raise UsageError(f"{self.root} was written by an older dpmem without masks.npy; it cannot be analysed")
        masks = load_npy(path, self._checked("masks.npy"))
        models = self.config().models
        if masks.ndim != 2 or masks.shape[0] != models or masks.dtype != bool:
            edited = self._edited_config()
            if edited is not None:
                raise edited
            raise UsageError(f"misshapen file {path}: expected bool [{models}, n_train], got {masks.dtype} {list(masks.shape)}")
        return masks

    def data(self) -> dict[str, np.ndarray]:
        out = {name: load_npy(self.root / "data" / f"{name}.npy", self._checked(f"data/{name}.npy"))
               for name in DATA_ARRAYS}
        for name in DATA_ARRAYS:
            if out[name].ndim != 1:
                raise UsageError(f"misshapen file {self.root / 'data' / f'{name}.npy'}: expected a vector")
        fp = self.fingerprint()
        if fp is not None:   # the stored labels are the ones the run's fingerprint describes
            self.check_fingerprint({k: array_fingerprint(out[k]) for k in ("y_train", "y_test")},
                                   f"the labels stored in {self.root / 'data'}")
        return out

    # -- variants ------------------------------------------------------------------------
    def variant_dir(self, name: str) -> Path:
        return self.root / "variants" / name

    def save_plan(self, name: str, plan: dict) -> None:
        atomic_write_json(self.variant_dir(name) / "plan.json", plan)

    def plan(self, name: str) -> dict | None:
        path = self.variant_dir(name) / "plan.json"
        return read_json(path) if path.exists() else None

    def _unit_dir(self, name: str, unit: ModelRange) -> Path:
        return self.variant_dir(name) / "units" / unit.name

    def _unit_record(self, name: str, unit: ModelRange) -> Path:
        return self.variant_dir(name) / "units" / f"{unit.name}.json"

    def _unit_intact(self, name: str, unit: ModelRange) -> bool:
        try:
            record = read_json(self._unit_record(name, unit))
            sums = record.get("sha256")
            if not isinstance(sums, dict) or not sums or (record.get("start"), record.get("stop")) != (unit.start, unit.stop):
                return False
            files = sorted(p.name for p in self._unit_dir(name, unit).glob("*.npy"))
            return files == sorted(f"{k}.npy" for k in sums) and all(
                sha256_file(self._unit_dir(name, unit) / f"{k}.npy") == v for k, v in sums.items())
        except (UsageError, OSError):
            return False

    def _drop_unit(self, name: str, unit: ModelRange) -> None:
        self._unit_record(name, unit).unlink(missing_ok=True)
        shutil.rmtree(self._unit_dir(name, unit), ignore_errors=True)

    def finished_units(self, name: str) -> list[ModelRange]:
        """The variant's units that are recorded and intact, sorted and disjoint. Anything else
        (a unit without its record, a damaged or truncated unit, an overlapping one) is deleted so
        that it is trained again."""
        cdir = self.variant_dir(name) / "units"
        if not cdir.is_dir():
            return []
        units = set()
        for path in cdir.iterdir():
            m = _UNIT.match(path.name.removesuffix(".json"))
            if m and int(m[1]) < int(m[2]):
                units.add(ModelRange(int(m[1]), int(m[2])))
        kept, at = [], 0
        for unit in sorted(units):
            if unit.start >= at and self._unit_intact(name, unit):
                kept.append(unit)
                at = unit.stop
            else:
                self._drop_unit(name, unit)
        return kept

    def pending_units(self, name: str, models: int, unit_size: int) -> list[ModelRange]:
        """Units still to train for ``models`` models in pieces of at most ``unit_size``."""
        if self.variant_complete(name):
            return []
        return fill_gaps(models, unit_size, [u for u in self.finished_units(name) if u.stop <= models])

    def write_unit(self, name: str, unit: ModelRange, arrays: dict[str, np.ndarray], record: dict) -> None:
        """Store one finished unit: its arrays, durable, in a directory renamed into place, then the record."""
        final = self._unit_dir(name, unit)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{unit.name}.", suffix=TMP_SUFFIX))
        try:
            os.chmod(tmp, 0o777 & ~current_umask())
            sums = {}
            for key in sorted(arrays):
                data = npy_bytes(arrays[key])
                with open(tmp / f"{key}.npy", "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                sums[key] = hashlib.sha256(data).hexdigest()
            fsync_dir(tmp)
            if final.exists():  # a unit written but not recorded before a crash: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(final.parent)
        atomic_write_json(self._unit_record(name, unit), {**record, "sha256": sums,
                                                           "start": unit.start, "stop": unit.stop})

    def finalize_variant(self, name: str, models: int) -> list[ModelRange]:
        """Concatenate the units into one [K, ...] array per key, record their checksums, drop the units.

        Returns the model ranges that must be trained (again) first: those no unit covers and units
        whose files no longer match their record (deleted here). An empty list means the variant is
        complete; otherwise ``pending_units`` splits what is left into units."""
        units = self.finished_units(name)
        missing = fill_gaps(models, models, [u for u in units if u.stop <= models])
        if missing:
            return missing
        vdir = self.variant_dir(name)
        records = [read_json(self._unit_record(name, c)) for c in units]
        keys = sorted(records[0]["sha256"])
        if any(sorted(r["sha256"]) != keys for r in records):
            for unit in units:
                self._drop_unit(name, unit)
            return units
        sums = {}
        for key in keys:
            parts = []
            for unit, record in zip(units, records):
                try:
                    parts.append(load_npy(self._unit_dir(name, unit) / f"{key}.npy", record["sha256"][key]))
                except UsageError:   # damaged since it was checked: train it again
                    self._drop_unit(name, unit)
                    return [unit]
            sums[key] = atomic_save_npy(vdir / f"{key}.npy", np.concatenate(parts))
        seconds = float(sum(r.get("seconds", 0.0) for r in records))
        atomic_write_json(vdir / "complete.json", {"models": models, "units": len(units), "arrays": keys,
                                                   "sha256": sums, "train_seconds": seconds})
        shutil.rmtree(vdir / "units", ignore_errors=True)
        return []

    def variant_complete(self, name: str) -> bool:
        return (self.variant_dir(name) / "complete.json").exists()

    def damaged_files(self, name: str) -> list[Path]:
        """Files of a complete variant that no longer match its completion record."""
        vdir = self.variant_dir(name)
        try:
            record = self.variant_record(name)
        except UsageError:
            return [vdir / "complete.json"]
        sums, arrays = record.get("sha256"), record.get("arrays")
        if self.format < 2:   # format 1 recorded no checksums: only those it has are checked
            sums, arrays = (sums if isinstance(sums, dict) else {}), [k for k in record.get("arrays", []) if k in (sums or {})]
        elif not isinstance(sums, dict) or not isinstance(arrays, list) or not arrays:
            return [vdir / "complete.json"]
        bad = []
        for key in arrays:
            try:
                # an array without a recorded checksum cannot be trusted: damaged
                if key not in sums or sha256_file(vdir / f"{key}.npy") != sums[key]:
                    bad.append(vdir / f"{key}.npy")
            except OSError:
                bad.append(vdir / f"{key}.npy")
        return bad

    def discard_variant(self, name: str) -> None:
        """Forget a variant's arrays so that it is trained again (its plan stays)."""
        vdir = self.variant_dir(name)
        (vdir / "complete.json").unlink(missing_ok=True)
        for path in vdir.glob("*.npy"):
            path.unlink()
        shutil.rmtree(vdir / "units", ignore_errors=True)

    def variant_arrays(self, name: str) -> dict[str, np.ndarray]:
        """Per-model arrays of a finished variant ({'train_correct': bool[K, n], ...}), each checked
        against the checksum in the completion record."""
        vdir = self.variant_dir(name)
        if not self.variant_complete(name):
            raise UsageError(f"variant {name!r} in {self.root} is not complete; run `dpmem run` again to finish it")
        done = self.variant_record(name)
        sums, arrays = done.get("sha256"), done.get("arrays")
        if self.format < 2:   # format 1 recorded no checksums
            sums, arrays = (sums if isinstance(sums, dict) else {}), (arrays if isinstance(arrays, list) else [])
        elif not isinstance(sums, dict) or not isinstance(arrays, list) or not arrays:
            raise UsageError(f"damaged file {vdir / 'complete.json'}: no array checksums; `dpmem run` with the "
                             "same config on this directory retrains the variant")
        else:
            for key in arrays:
                if not isinstance(sums.get(key), str):
                    raise UsageError(f"damaged file {vdir / 'complete.json'}: no checksum for {key}.npy; `dpmem "
                                     "run` with the same config on this directory retrains the variant")
        out = {key: load_npy(vdir / f"{key}.npy", sums.get(key)) for key in arrays}
        for key, array in out.items():
            if array.ndim < 1 or array.shape[0] != done.get("models", array.shape[0]):
                raise UsageError(f"misshapen file {vdir / f'{key}.npy'}: expected {done.get('models')} rows, "
                                 f"got shape {list(array.shape)}")
        return out

    def variant_record(self, name: str) -> dict:
        return read_json(self.variant_dir(name) / "complete.json")
