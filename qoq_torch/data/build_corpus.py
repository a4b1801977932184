"""Build the reference corpus from Debian's ``python3.11-doc`` (PSF licence) and ``linux-doc-6.1`` (GPL-2).

Run ``python -m qoq_torch.data.build_corpus --deb python3.11-doc_*.deb [linux-doc-6.1_*.deb] --out DIR``
(``apt-get download python3.11-doc linux-doc-6.1`` fetches the packages). Every HTML page of a manual becomes one
document of plain prose (code listings and navigation are dropped, markup is stripped). Whole documents are
assigned to one of three disjoint splits by a hash of their path (prefixed by the package name, except for
python3.11-doc's, which keep the reference corpus' paths), so the split is stable across machines and package
rebuilds, and adding a manual leaves the other manuals' splits unchanged:

- ``eval``  (~6%): held-out text for perplexity; python3.11-doc's is shipped in the package.
- ``calib`` (~4%): calibration text for ``quantize()``; python3.11-doc's is shipped in the package.
- ``train`` (the rest): training text for the reference model; not shipped (regenerate it with this module).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Index, search and table-of-contents pages are lists of names, not prose.
_SKIPPED_PAGES = re.compile(r"(^|/)(genindex.*|py-modindex|search|contents|copyright|bugs|download)\.html$")
_SKIPPED_TAGS = {"script", "style", "pre", "nav", "head", "title"}
_BLOCK_TAGS = {"p", "div", "section", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
               "ul", "ol", "dl", "blockquote", "br", "caption", "figure"}
_SPLIT_BUCKETS = {"eval": range(0, 6), "calib": range(6, 10)}  # out of 100; the rest is train
_SPLITS = ("train", "calib", "eval")


_VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "wbr", "col", "source"}


@dataclass(frozen=True)
class Manual:
    """Where a documentation package keeps its Sphinx HTML manual and which of its pages are prose."""

    html_dir: str  # inside the package
    path_prefix: str  # prepended to page paths: document names and the split hash
    skipped_pages: re.Pattern[str]
    min_prose_fraction: float  # of the main body's text; below it a page is mostly tables or code


MANUALS = {
    "python3.11-doc": Manual("usr/share/doc/python3.11/html", "", _SKIPPED_PAGES, 0.0),
    # English pages only; directory index.html pages are mostly tables of contents.
    "linux-doc-6.1": Manual("usr/share/doc/linux-doc-6.1/html", "linux-doc-6.1/",
                            re.compile(r"^translations/|(^|/)(genindex|search|index)\.html$"), 0.5),
}


class _ProseExtractor(html.parser.HTMLParser):
    """Collects the text of Sphinx's ``<div role="main">``, one paragraph per block element.

    A stack of open elements records, per element, whether it opens the main body and whether its content is
    skipped (code listings, scripts, the pilcrow anchors after headings).
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._current: list[str] = []
        self._open: list[tuple[str, bool, bool]] = []  # (tag, opens_main, skips)
        self._main_depth = 0
        self._skip_depth = 0
        self.main_chars = 0  # non-space characters of the main body, skipped content included

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag in _VOID_TAGS:
            return
        attr = dict(attrs)
        classes = (attr.get("class") or "").split()
        opens_main = tag == "div" and attr.get("role") == "main"
        skips = tag in _SKIPPED_TAGS or "headerlink" in classes or any(c.startswith("highlight") for c in classes)
        self._open.append((tag, opens_main, skips))
        self._main_depth += opens_main
        self._skip_depth += skips

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID_TAGS:
            return
        # Pop up to the matching open element (tolerates unclosed inline tags).
        while self._open:
            open_tag, opens_main, skips = self._open.pop()
            self._main_depth -= opens_main
            self._skip_depth -= skips
            if open_tag == tag:
                break
        if tag in _BLOCK_TAGS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._main_depth:
            self.main_chars += len("".join(data.split()))
            if not self._skip_depth:
                self._current.append(data)

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self._current)).strip()
        self._current = []
        if text:
            self.paragraphs.append(text)


def prose_and_fraction(markup: str) -> tuple[str, float]:
    """Plain text of one Sphinx HTML page and its share of the main body's non-space characters."""
    parser = _ProseExtractor()
    parser.feed(markup)
    parser.close()
    # Fragments of a few words are headings, table cells and signatures; keep sentences.
    kept = [p for p in parser.paragraphs if len(p.split()) >= 6]
    text = "\n".join(kept)
    return text, len("".join(text.split())) / max(1, parser.main_chars)


def html_to_prose(markup: str) -> str:
    """Plain text of one Sphinx HTML page: paragraphs joined by newlines, short fragments dropped."""
    return prose_and_fraction(markup)[0]


def split_of(doc_path: str) -> str:
    """Stable split assignment of a document by the hash of its path inside the manual."""
    bucket = int(hashlib.sha256(doc_path.encode()).hexdigest(), 16) % 100
    for name, buckets in _SPLIT_BUCKETS.items():
        if bucket in buckets:
            return name
    return "train"


def documents_from_html_dir(html_root: Path, manual: Manual = MANUALS["python3.11-doc"]) -> list[dict[str, str]]:
    """Every prose page under ``html_root`` as ``{"path", "split", "text"}``, sorted by path."""
    docs = []
    for page in sorted(html_root.rglob("*.html")):
        rel = page.relative_to(html_root).as_posix()
        if manual.skipped_pages.search(rel) or rel.startswith("_"):
            continue
        text, fraction = prose_and_fraction(page.read_text(encoding="utf-8", errors="replace"))
        if len(text) >= 500 and fraction >= manual.min_prose_fraction:
            path = manual.path_prefix + rel
            docs.append({"path": path, "split": split_of(path), "text": text})
    return docs


def _extract_deb(deb: Path, workdir: Path) -> tuple[str, Manual, Path]:
    """Unpack ``deb`` into ``workdir``; returns its package name, its manual and the manual's HTML root."""
    package = subprocess.run(["dpkg-deb", "-f", str(deb), "Package"], check=True, capture_output=True,
                             text=True).stdout.strip()
    if package not in MANUALS:
        raise SystemExit(f"{deb}: package {package!r} is none of {sorted(MANUALS)}")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir)], check=True)
    return package, MANUALS[package], workdir / MANUALS[package].html_dir


def _split_stats(docs: list[dict[str, str]]) -> dict[str, dict[str, int]]:
    return {split: {"documents": sum(d["split"] == split for d in docs),
                    "characters": sum(len(d["text"]) for d in docs if d["split"] == split)} for split in _SPLITS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deb", type=Path, nargs="+", default=[],
                    help=f"one or more packages among {', '.join(MANUALS)}, in output order (or use --html-root)")
    ap.add_argument("--html-root", type=Path, help="an already extracted .../doc/python3.11/html")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not args.deb and not args.html_root:
        ap.error("give --deb or --html-root")
    args.out.mkdir(parents=True, exist_ok=True)
    docs, per_package = [], {}
    if args.html_root:
        docs = documents_from_html_dir(args.html_root)
    with tempfile.TemporaryDirectory() as tmp:
        for i, deb in enumerate(args.deb):
            package, manual, root = _extract_deb(deb, Path(tmp) / str(i))
            found = documents_from_html_dir(root, manual)
            docs += found
            per_package[package] = _split_stats(found)
            copyright_file = Path(tmp) / str(i) / "usr/share/doc" / package / "copyright"
            if copyright_file.is_file():  # the licence travels with the text
                shutil.copyfile(copyright_file, args.out / f"COPYRIGHT.debian-{package}")
    for split in _SPLITS:
        with gzip.open(args.out / f"{split}.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as f:
            for d in docs:
                if d["split"] == split:
                    f.write(json.dumps({"path": d["path"], "text": d["text"]}, ensure_ascii=False) + "\n")
    print(json.dumps({**_split_stats(docs), **per_package}, indent=1))


if __name__ == "__main__":
    main()
