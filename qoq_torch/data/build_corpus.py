"""Build the reference corpus from Debian's ``python3.11-doc`` package (PSF licence).

Run ``python -m qoq_torch.data.build_corpus --deb python3.11-doc_*.deb --out DIR`` (``apt-get download
python3.11-doc`` fetches the package). Every HTML page of the manual becomes one document of plain prose
(code listings and navigation are dropped, markup is stripped). Whole documents are assigned to one of three
disjoint splits by a hash of their path, so the split is stable across machines and package rebuilds:

- ``eval``  (~6%): held-out text for perplexity; shipped in the package.
- ``calib`` (~4%): calibration text for ``quantize()``; shipped in the package.
- ``train`` (the rest): training text for the reference model; not shipped (regenerate it with this module).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import json
import re
import subprocess
import tempfile
from pathlib import Path

# Index, search and table-of-contents pages are lists of names, not prose.
_SKIPPED_PAGES = re.compile(r"(^|/)(genindex.*|py-modindex|search|contents|copyright|bugs|download)\.html$")
_SKIPPED_TAGS = {"script", "style", "pre", "nav", "head", "title"}
_BLOCK_TAGS = {"p", "div", "section", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
               "ul", "ol", "dl", "blockquote", "br", "caption", "figure"}
_SPLIT_BUCKETS = {"eval": range(0, 6), "calib": range(6, 10)}  # out of 100; the rest is train


_VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "wbr", "col", "source"}


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
        if self._main_depth and not self._skip_depth:
            self._current.append(data)

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self._current)).strip()
        self._current = []
        if text:
            self.paragraphs.append(text)


def html_to_prose(markup: str) -> str:
    """Plain text of one Sphinx HTML page: paragraphs joined by newlines, short fragments dropped."""
    parser = _ProseExtractor()
    parser.feed(markup)
    parser.close()
    # Fragments of a few words are headings, table cells and signatures; keep sentences.
    kept = [p for p in parser.paragraphs if len(p.split()) >= 6]
    return "\n".join(kept)


def split_of(doc_path: str) -> str:
    """Stable split assignment of a document by the hash of its path inside the manual."""
    bucket = int(hashlib.sha256(doc_path.encode()).hexdigest(), 16) % 100
    for name, buckets in _SPLIT_BUCKETS.items():
        if bucket in buckets:
            return name
    return "train"


def documents_from_html_dir(html_root: Path) -> list[dict[str, str]]:
    """Every prose page under ``html_root`` as ``{"path", "split", "text"}``, sorted by path."""
    docs = []
    for page in sorted(html_root.rglob("*.html")):
        rel = page.relative_to(html_root).as_posix()
        if _SKIPPED_PAGES.search(rel) or rel.startswith("_"):
            continue
        text = html_to_prose(page.read_text(encoding="utf-8", errors="replace"))
        if len(text) >= 500:
            docs.append({"path": rel, "split": split_of(rel), "text": text})
    return docs


def _html_root_of_deb(deb: Path, workdir: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir)], check=True)
    return workdir / "usr/share/doc/python3.11/html"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deb", type=Path, help="python3.11-doc_*.deb (or use --html-root)")
    ap.add_argument("--html-root", type=Path, help="an already extracted .../doc/python3.11/html")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.html_root or _html_root_of_deb(args.deb, Path(tmp))
        docs = documents_from_html_dir(root)
    args.out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split in ("train", "calib", "eval"):
        part = [d for d in docs if d["split"] == split]
        with gzip.open(args.out / f"{split}.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as f:
            for d in part:
                f.write(json.dumps({"path": d["path"], "text": d["text"]}, ensure_ascii=False) + "\n")
        stats[split] = {"documents": len(part), "characters": sum(len(d["text"]) for d in part)}
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
