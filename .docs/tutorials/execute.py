"""Execute the tutorials and render them, with their output, as pages of the site.

    python .docs/tutorials/execute.py [NAME ...]

Each tutorial is a plain Python script in jupytext's percent format (``# %%`` starts a code cell,
``# %% [markdown]`` a cell of ``# ``-prefixed Markdown): ``python audit_opacus.py`` runs it, and
jupytext opens it as a notebook. Here every cell runs in order in one namespace (registered as
``__main__``, as when the script is run), in a fresh working directory; what it prints is captured
and every figure shown with ``plt.show()`` is saved as a PNG. A cell that raises stops the
tutorial and exits 1, so CI fails when a tutorial breaks. Pages go to .docs/build/tutorials/.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "build" / "tutorials"
# script -> page name (the site's nav names the pages)
TUTORIALS = {"audit_opacus.py": "audit-opacus", "memorization.py": "memorization"}
LIMIT_S = 120   # each tutorial must run in at most 2 minutes on a 2-core machine


def cells(text: str) -> list[tuple[str, str]]:
    """(kind, source) of each cell: kind "markdown" or "code"."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        marker = re.match(r"^# %%(.*)$", line)
        if marker:
            out.append(("markdown" if "[markdown]" in marker.group(1) else "code", []))
        elif out:
            out[-1][1].append(line)
    rendered = []
    for kind, lines in out:
        if kind == "markdown":
            body = "\n".join(ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines).strip()
        else:
            body = "\n".join(lines).strip()
        if body:
            rendered.append((kind, body))
    return rendered


def run(script: Path, page: str) -> float:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figures_dir = OUT / f"{page}_files"
    figures_dir.mkdir(parents=True, exist_ok=True)
    for old in figures_dir.glob("*.png"):
        old.unlink()
    shown: list[str] = []

    def show(*_args, **_kwargs) -> None:
        for number in plt.get_fignums():
            name = f"figure-{len(shown) + 1}.png"
            plt.figure(number).savefig(figures_dir / name, dpi=80, bbox_inches="tight")
            shown.append(name)
        plt.close("all")

    plt.show = show
    module = types.ModuleType("__main__")
    module.__file__ = str(script)
    saved_main, saved_cwd = sys.modules.get("__main__"), os.getcwd()
    parts = [f"<!-- executed from .docs/tutorials/{script.name} by .docs/tutorials/execute.py -->\n"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"dpmem-tutorial-{page}-") as work:
        os.chdir(work)
        sys.modules["__main__"] = module
        sys.path.insert(0, work)
        try:
            for kind, source in cells(script.read_text()):
                if kind == "markdown":
                    parts.append(source + "\n")
                    continue
                parts.append(f"```python\n{source}\n```\n")
                before = len(shown)
                buffer = io.StringIO()
                try:
                    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                        exec(compile(source, f"{script.name} cell", "exec"), module.__dict__)
                except BaseException:
                    print(buffer.getvalue(), file=sys.stderr)
                    traceback.print_exc()
                    raise SystemExit(f"tutorial {script.name}: a cell failed:\n{source}") from None
                text = _clean(buffer.getvalue())
                if text.strip():
                    parts.append(f"```text\n{text.rstrip()}\n```\n")
                parts += [f"![figure](./{page}_files/{name})\n" for name in shown[before:]]
        finally:
            os.chdir(saved_cwd)
            sys.path.remove(work)
            if saved_main is not None:
                sys.modules["__main__"] = saved_main
    seconds = time.perf_counter() - t0
    (OUT / f"{page}.md").write_text("\n".join(parts))
    return seconds


def _clean(text: str) -> str:
    """Progress bars and the temporary directory's name are not part of the lesson."""
    text = re.sub(r"[^\n]*\r", "", text)                              # tqdm's carriage-return updates
    return re.sub(r"/tmp/dpmem-tutorial-[^/\s]*/", "", text)


def main(argv: list[str]) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    names = argv or list(TUTORIALS)
    OUT.mkdir(parents=True, exist_ok=True)
    slow = []
    for name in names:
        seconds = run(HERE / name, TUTORIALS[name])
        print(f"tutorial {name}: {seconds:.1f} s", file=sys.stderr)
        if seconds > LIMIT_S:
            slow.append(f"{name} took {seconds:.0f} s (limit {LIMIT_S} s)")
    if slow:
        print("tutorials too slow: " + "; ".join(slow), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
