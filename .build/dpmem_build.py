"""dpmem's build backend: setuptools's own, with PEP 561's ``py.typed`` marker written into the built
package. The repository root is the package and keeps only its listed entries, so the marker, an
empty file that tells type checkers the package's annotations are its public types, is made when
the package is built rather than kept beside the sources."""
from __future__ import annotations

from pathlib import Path

from setuptools.build_meta import *  # noqa: F403  (the PEP 517 hooks, unchanged)
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """setuptools's build_py, then the empty ``dpmem/py.typed`` in the build tree (and so in the wheel)."""

    def run(self) -> None:
        super().run()
        marker = Path(self.build_lib) / "dpmem" / "py.typed"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / "dpmem" / "py.typed")]
