"""The release: dpmem's version and, from a git checkout, the commit (every run records both).

They live at the bottom of the package, as the errors do, so that every layer can read them."""
from __future__ import annotations

import subprocess
from pathlib import Path

# The package's version; pyproject.toml and .docs/CHANGELOG.md agree with it (tests/test_public_contracts.py).
VERSION = "0.2.0"


def source_commit(root: Path | None = None) -> str | None:
    """The git commit of the checkout dpmem is imported from (``+modified`` when tracked files
    differ from it), or None: an installed wheel has no .git, or git is not there."""
    if root is None:
        root = Path(__file__).resolve().parents[1]   # the repository root is the package
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+modified" if changed else head
