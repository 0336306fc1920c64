"""The one array fingerprint every part of dpmem uses: a run records its data by it, and refuses
to resume, add a study to or report on other data."""
from __future__ import annotations

import hashlib

import numpy as np


def array_fingerprint(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and values (independent of memory layout)."""
    a = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    digest.update(a.tobytes())
    return digest.hexdigest()


def arrays_fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """One digest over named arrays (each by ``array_fingerprint``), in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(f"{name}={array_fingerprint(arrays[name])};".encode())
    return "sha256:" + digest.hexdigest()
