"""Build the documentation site: ``python .docs/build.py`` (after ``python .docs/tutorials/execute.py``).

The room documents (README.md, bench/README.md, models/README.md, privacy/README.md,
results/README.md) stay the one copy of every fact. This script cuts them at their ``##`` headings
and arranges the sections into the site's pages (``PAGES``), rewrites their links to the pages that
now hold each section, copies the files they link to (source files, result tables, figures) into
the site, adds the hand-written pages (``.docs/pages``) and the executed tutorials, writes the
MkDocs config with the navigation and runs ``mkdocs build --strict``: a broken link or anchor, a
heading ``PAGES`` names that no room document has, or a public name without a docstring fails the
build (a new section that no page names goes to its room's first page, and the build says so).

Output: ``.docs/build/site/index.html`` (open it in a browser; search works offline).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = HERE / "build"
DOCS = BUILD / "docs"
SITE = BUILD / "site"
SOURCES = Path(tempfile.gettempdir()) / f"dpmem-docs-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]}"
ROOMS = ["README.md", "bench/README.md", "models/README.md", "privacy/README.md", "results/README.md"]
INTRO = "(intro)"        # the text of a room document before its first ## heading

# The site's pages: (nav section, page path, title, [(room document, ## heading or INTRO), ...]).
# A heading is matched by its start; every section of every room document is on exactly one page
# (a section no page names is added to its room's first page, and the build says so).
PAGES: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    ("Getting started", "index.md", "dpmem", [("README.md", INTRO), ("README.md", "Quick start")]),
    ("Getting started", "start/run.md", "What a run does", [
        ("bench/README.md", INTRO), ("bench/README.md", "What a run does")]),
    ("Getting started", "start/commands.md", "Commands and the Python API", [
        ("README.md", "Commands"), ("README.md", "Python API")]),
    ("Getting started", "start/default-result.md", "The default benchmark", [
        ("README.md", "Result: the default benchmark"), ("README.md", "Membership inference and memorization")]),
    ("Concepts", "concepts/estimator.md", "The estimator and its findings", [
        ("bench/README.md", "Reading the outputs")]),
    ("Concepts", "concepts/bound.md", "Accounting and the DP bound", [
        ("privacy/README.md", INTRO), ("privacy/README.md", "Accounting"),
        ("privacy/README.md", "The black-box audit")]),
    ("Concepts", "concepts/audits.md", "The audits and their kinds", [
        ("README.md", "Auditing a DP claim"), ("privacy/README.md", "The margin audit"),
        ("privacy/README.md", "The gradient-canary audit"),
        ("privacy/README.md", "Canary audits: one-run"), ("privacy/README.md", "Planted bugs")]),
    ("Concepts", "concepts/engine.md", "The engine", [
        ("models/README.md", INTRO), ("models/README.md", "The semantics every engine shares"),
        ("models/README.md", "The many-model engine")]),
    ("Concepts", "concepts/speed.md", "Speed", [("README.md", "Speed"), ("models/README.md", "Speed")]),
    ("Concepts", "concepts/studies.md", "Studies", [("bench/README.md", "Studies")]),
    ("How-to guides", "howto/your-data-and-model.md", "Your data and your model", [
        ("bench/README.md", "Bring your own")]),
    ("How-to guides", "howto/your-trainer.md", "Your trainer", [
        ("models/README.md", "The trainer protocol"), ("models/README.md", "Your own DP training"),
        ("privacy/README.md", "Auditing your own DP training")]),
    ("How-to guides", "howto/ci.md", "A privacy budget in CI", [("privacy/README.md", "Guarding a privacy budget")]),
    ("How-to guides", "howto/workers.md", "Many cores, many machines", [("bench/README.md", "Many cores")]),
    ("How-to guides", "howto/galleries.md", "Galleries and report.html", [("bench/README.md", "Example galleries")]),
    ("Results", "results/index.md", "Every committed result", [("results/README.md", INTRO)]),
    ("Results", "results/studies.md", "The studies' results", [
        ("results/README.md", "What the studies test"), ("results/README.md", "The default benchmark"),
        ("results/README.md", "The estimator against exact leave-one-out"),
        ("results/README.md", "Memorization versus generalization"),
        ("results/README.md", "Marginal utility"), ("results/README.md", "Feldman's long-tail theorem"),
        ("results/README.md", "The MNIST-1D CNN benchmark")]),
    ("Results", "results/engine.md", "Speed, residual nets, reliability", [
        ("results/README.md", "Speed"), ("results/README.md", "Residual nets"), ("results/README.md", "Reliability")]),
    ("Results", "results/audits.md", "Audits, membership inference and proxies", [
        ("results/README.md", "Audits"), ("results/README.md", "Membership inference on the default run"),
        ("results/README.md", "Memorization proxies")]),
    ("Results", "results/provenance.md", "What moved, and regenerating", [
        ("results/README.md", "What moved with the PRV default"), ("results/README.md", "Regenerating")]),
    ("Reference", "reference/config.md", "Config keys", [("bench/README.md", "Config keys")]),
    ("Reference", "reference/outputs.md", "Output files", [("bench/README.md", "Output files")]),
    ("Reference", "reference/failures.md", "No silent failure", [("bench/README.md", "No silent failure")]),
    ("Reference", "reference/scripts.md", "Scripts", [("bench/README.md", "Scripts")]),
    ("Reference", "reference/layout.md", "Where everything lives", [("README.md", "Where everything lives")]),
]
# Hand-written pages (.docs/pages) and the executed tutorials, by nav section.
TUTORIALS = [("tutorials/audit-opacus.md", "Audit your own Opacus training"),
             ("tutorials/memorization.md", "Memorization and the cost of DP on your data")]
# (nav section, page path, title, source: a repository path, or None for .docs/pages/PATH)
HANDWRITTEN = [("Reference", "reference/api.md", "Python API", None),
               ("About", "about/site.md", "This site", None),
               ("About", "about/citing.md", "Citing dpmem", None),
               ("About", "about/changelog.md", "Changelog", ".docs/CHANGELOG.md")]
NAV_ORDER = ["Getting started", "Tutorials", "Concepts", "How-to guides", "Results", "Reference", "About"]


@dataclass
class Section:
    room: str              # the room document, a repository path
    heading: str           # the ## heading's text (INTRO for the text before the first)
    lines: list[str] = field(default_factory=list)


def _fences(lines: list[str]):
    """(line, inside a code fence) for each line."""
    inside = False
    for line in lines:
        if line.lstrip().startswith("```"):
            inside = not inside
            yield line, True
        else:
            yield line, inside


def split_room(room: str) -> list[Section]:
    lines = (ROOT / room).read_text().splitlines()
    sections = [Section(room, INTRO)]
    for line, fenced in _fences(lines):
        if not fenced and line.startswith("## "):
            sections.append(Section(room, line[3:].strip()))
        sections[-1].lines.append(line)
    intro = sections[0]
    intro.lines = [ln for ln in intro.lines if not ln.startswith("# ")]   # the room's title: the page has its own
    return sections


def heading_text(markdown_heading: str) -> str:
    """What a heading shows: links replaced by their text, code marks dropped."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", markdown_heading)
    return text.replace("`", "").replace("*", "").strip()


def slug(text: str) -> str:
    """GitHub's heading anchors (the room documents link with them), as pymdownx.slugs makes them."""
    text = heading_text(text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")


class Site:
    def __init__(self) -> None:
        self.sections = {room: split_room(room) for room in ROOMS}
        self.page_of: dict[tuple[str, str], str] = {}      # (room, anchor) -> page
        self.first_page: dict[str, str] = {}               # room -> the page with its intro
        self.pages: dict[str, tuple[str, list[Section]]] = {}
        self.copied: dict[str, str] = {}                   # repository path -> site path
        self.extra_pages: list[str] = []                   # copied Markdown files (result tables)
        self.notes: list[str] = []
        self.site_pages = {p for _, p, _, _ in PAGES} | {p for p, _ in TUTORIALS} | {p for _, p, _, _ in HANDWRITTEN}
        taken: set[int] = set()
        for _, path, title, wanted in PAGES:
            chosen = []
            for room, start in wanted:
                matches = [s for s in self.sections[room] if (s.heading == INTRO if start == INTRO
                                                              else heading_text(s.heading).startswith(start))]
                if len(matches) != 1:
                    raise SystemExit(f"docs: page {path}: {room} has {len(matches)} sections starting {start!r}")
                if id(matches[0]) in taken:
                    raise SystemExit(f"docs: {room} section {start!r} is on two pages")
                taken.add(id(matches[0]))
                chosen.append(matches[0])
            self.pages[path] = (title, chosen)
            for s in chosen:
                if s.heading == INTRO:
                    self.first_page.setdefault(s.room, path)
        for room, sections in self.sections.items():
            for s in sections:
                if id(s) not in taken and "".join(s.lines).strip():
                    page = self.first_page[room]
                    self.pages[page][1].append(s)
                    self.notes.append(f"docs: {room} section {s.heading!r} is on no page; added to {page}")
        for path, (_, chosen) in self.pages.items():
            for s in chosen:
                for line, fenced in _fences(s.lines):
                    if not fenced and re.match(r"#{2,6} ", line):
                        self.page_of.setdefault((s.room, slug(line.lstrip("#").strip())), path)

    # -- links -----------------------------------------------------------------------------
    def target(self, source: str, link: str, page: str) -> str | None:
        """The link as the page must write it, or None to drop the link (keep its text)."""
        if re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("//"):
            return link                                      # http(s), mailto
        path, _, anchor = link.partition("#")
        on_site = posixpath.normpath(posixpath.join(posixpath.dirname(page), path))
        if source.startswith(".docs/pages/") and path and on_site in self.site_pages:
            return link                                      # a hand-written page's link to a page of the site
        repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(source), path)) if path else source
        if repo_path in self.sections:                       # a room document: the page holding the section
            where = self.page_of.get((repo_path, anchor)) if anchor else self.first_page[repo_path]
            if where is None:
                raise SystemExit(f"docs: {source} links to {link}: no heading {anchor!r} in {repo_path}")
            return _relative(where, page) + (f"#{anchor}" if anchor and where else "")
        full = ROOT / repo_path
        if full.is_dir():
            return None
        if not full.is_file():
            raise SystemExit(f"docs: {source} links to {link}, which does not exist ({repo_path})")
        return _relative(self.copy(repo_path), page) + (f"#{anchor}" if anchor else "")

    def copy(self, repo_path: str) -> str:
        """Put a linked file into the site (under src/, dot-folders renamed) and return its site path."""
        if repo_path in self.copied:
            return self.copied[repo_path]
        parts = [("dot-" + p[1:]) if p.startswith(".") else p for p in repo_path.split("/")]
        site_path = "src/" + "/".join(parts)
        self.copied[repo_path] = site_path
        dest = DOCS / site_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        if repo_path.endswith(".md"):                          # a result table: a page of its own, links rewritten
            text = (ROOT / repo_path).read_text()
            dest.write_text(self.rewrite(text.splitlines(), repo_path, site_path))
            self.extra_pages.append(site_path)
        else:
            shutil.copyfile(ROOT / repo_path, dest)
        return site_path

    def rewrite(self, lines: list[str], source: str, page: str) -> str:
        out = []
        for line, fenced in _fences(lines):
            if not fenced:
                line = LINK.sub(lambda m: self._link(m, source, page), line)
            out.append(line)
        return "\n".join(out) + "\n"

    def _link(self, m: re.Match, source: str, page: str) -> str:
        bang, text, link = m.groups()
        where = self.target(source, link, page)
        if where is None:
            return text
        named = re.fullmatch(r"`([^`]*README\.md)`", text)
        if named and not link.startswith("#"):     # `bench/README.md` -> the title of the page it became
            target_page = posixpath.normpath(posixpath.join(posixpath.dirname(page), where.partition("#")[0]))
            if target_page in self.pages:
                text = self.pages[target_page][0]
        return f"{bang}[{text}]({where})"

    # -- output ----------------------------------------------------------------------------
    def write(self) -> None:
        for path, (title, chosen) in self.pages.items():
            body = [f"# {title}\n"]
            for s in chosen:
                origin = f"<!-- from {s.room}: {heading_text(s.heading)} -->"
                body.append(origin + "\n" + self.rewrite(s.lines, s.room, path))
            dest = DOCS / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text("\n".join(body))


def _relative(target: str, page: str) -> str:
    return posixpath.relpath(target, posixpath.dirname(page) or ".")


def check_docstrings() -> None:
    """Every name in ``dpmem.__all__``, and every public member of ``Run``, has a docstring (read
    statically, as mkdocstrings reads them; ``canaries`` is the module ``dpmem.models.canaries``)."""
    import ast

    import griffe
    tree = ast.parse((ROOT / "__init__.py").read_text())
    exported = next(ast.literal_eval(node.value) for node in tree.body
                    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "__all__")
    package = griffe.load("dpmem", search_paths=[str(SOURCES)], resolve_aliases=True)
    missing = []
    for name in exported:
        obj = package["models.canaries"] if name == "canaries" else package[name]
        if not obj.docstring:
            missing.append(f"dpmem.{name}")
        if name == "Run":
            missing += [f"dpmem.Run.{m}" for m, member in obj.members.items()
                        if not m.startswith("_") and not member.docstring]
    if missing:
        raise SystemExit(f"docs: no docstring: {', '.join(missing)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-build", action="store_true", help="assemble the pages only (no mkdocs build)")
    args = parser.parse_args(argv)
    if DOCS.exists():
        shutil.rmtree(DOCS)
    DOCS.mkdir(parents=True)
    # the repository root is the package: mkdocstrings and the docstring check find it through a link
    # named dpmem, outside the repository (inside, a walk of the package would meet the link again)
    SOURCES.mkdir(parents=True, exist_ok=True)
    link = SOURCES / "dpmem"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(ROOT, target_is_directory=True)
    site = Site()
    site.write()
    for _, path, _, source in HANDWRITTEN:
        source = source or f".docs/pages/{path}"
        dest = DOCS / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        site.copied[source] = path
        dest.write_text(site.rewrite((ROOT / source).read_text().splitlines(), source, path))
    for path, _ in TUTORIALS:
        rendered = BUILD / "tutorials" / Path(path).name
        if not rendered.is_file():
            raise SystemExit(f"docs: {rendered} is missing: run `python .docs/tutorials/execute.py` first")
        dest = DOCS / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(rendered, dest)
        figures = BUILD / "tutorials" / (Path(path).stem + "_files")
        if figures.is_dir():
            shutil.copytree(figures, DOCS / "tutorials" / figures.name)
    shutil.copytree(HERE / "assets", DOCS / "assets", ignore=shutil.ignore_patterns("README", "LICENSE"))
    for note in site.notes:
        print(note, file=sys.stderr)
    check_docstrings()
    write_config(site)
    if args.no_build:
        return 0
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f",
                           str(BUILD / "mkdocs.yml")], cwd=BUILD, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    if done.returncode == 0:
        print(f"docs: {len(site.site_pages)} pages in the navigation and {len(site.extra_pages)} linked documents "
              f"in {SITE.relative_to(ROOT)} (open {(SITE / 'index.html').relative_to(ROOT)})", file=sys.stderr)
    return done.returncode


def write_config(site: Site) -> None:
    """build/mkdocs.yml: .docs/mkdocs.yml (paths relative to build/) and the navigation."""
    nav: dict[str, list] = {name: [] for name in NAV_ORDER}
    for section, path, title, _ in PAGES:
        nav[section].append({title: path})
    for path, title in TUTORIALS:
        nav["Tutorials"].append({title: path})
    for section, path, title, _ in HANDWRITTEN:
        nav[section].append({title: path})
    if site.extra_pages:
        nav["Results"].append({"Linked documents": [{_table_title(p): p} for p in sorted(site.extra_pages)]})
    generated = yaml.safe_dump({"nav": [{name: items} for name, items in nav.items() if items]}, sort_keys=False)
    base = (HERE / "mkdocs.yml").read_text().replace("paths: [src]", f"paths: [{SOURCES}]")
    (BUILD / "mkdocs.yml").write_text(base + "\n# generated by .docs/build.py\n" + generated)


def _table_title(site_path: str) -> str:
    first = (DOCS / site_path).read_text().lstrip().splitlines()[0]
    title = first.lstrip("#").strip() if first.startswith("#") else site_path.removeprefix("src/")
    return f"{site_path.removeprefix('src/')}: {title}" if first.startswith("#") else title


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
