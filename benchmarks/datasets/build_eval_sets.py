#!/usr/bin/env python
"""Build the real-question evaluation sets (BEIR layout) from Debian documentation packages.

Three FAQs that nobody on this project wrote, each question a real user's question as its
maintainers wrote it down, its relevant document the FAQ's own answer:

* ``python-faq`` — the Python FAQ (``python3.11-doc``: ``html/faq/*.html``); distractors:
  sections of the Python library reference of the same package;
* ``perl-faq`` — perlfaq1-9 (``perl-doc``: ``pod/perlfaq*.pod``); distractors: the
  entries of ``perlfunc`` and the sections of ``perlop``, ``perlsyn``, ``perlre``, ``perlvar``;
* ``debian-faq`` — the Debian FAQ (``debian-faq``: ``FAQ/*.en.html``); distractors: none
  but the other answers (120 questions: a small third domain, system administration);

and two sets of short keyword queries, the words a user types into a search box:

* ``man-pages`` — the Linux man-pages project (``manpages``, ``manpages-dev``): a query is a
  page's NAME line ("open and possibly create a file"), its relevant document the rest of the
  page (NAME excluded, rendered to text by ``groff``); every other page is a distractor;
* ``debian-packages`` — Debian 12's package descriptions (``main/i18n/Translation-en.xz`` of
  bookworm, pinned by its SHA-256): a query is a package's one-line synopsis ("elegant and
  simple HTTP library for Python3"), its relevant document the package's name and long
  description (synopsis excluded); a fixed-seed sample of other packages are distractors.

Only headings that end in "?" are questions; a question's answer is the text of its section,
heading excluded.  Each set is split in halves by a hash of the question id: ``qrels/tune.tsv``
(for choosing fusion weights) and ``qrels/test.tsv`` (for reporting).  The packages are
downloaded with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a temporary
folder (no root, nothing installed).  The outputs are committed under
``benchmarks/datasets/``; see the README there for provenance and licenses.

    python -m benchmarks.datasets.build_eval_sets [--out benchmarks/datasets]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import html
import json
import random
import re
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

OUT = Path(__file__).resolve().parent
PACKAGES = {"python-faq": ("python3.11-doc",), "perl-faq": ("perl-doc",),
            "debian-faq": ("debian-faq",), "man-pages": ("manpages", "manpages-dev"),
            "debian-packages": ()}
#: bookworm's English package descriptions, as its InRelease file pins them
TRANSLATIONS_URL = "http://deb.debian.org/debian/dists/bookworm/main/i18n/Translation-en.xz"
TRANSLATIONS_SHA256 = "a3d4a0bfd8e9242810b0885eda7c1a6e05dac15b333ddbaab03ba56f2dfa4bf0"
#: keyword sets: how many of their pages / packages are queries (a hash-ordered sample; the
#: rest, and for debian-packages PKG_DOCUMENTS in all, are the corpus)
KEYWORD_QUERIES = 400
PKG_DOCUMENTS = 4000
#: distractor sections kept for python-faq (a deterministic sample of the library reference)
PY_DISTRACTORS = 2500


def unpack(packages: tuple[str, ...], into: Path) -> Path:
    """``apt-get download`` + ``dpkg-deb -x``: the packages' files under one root."""
    root = into / "root"
    for package in packages:
        subprocess.run(["apt-get", "download", "-qq", package], cwd=into, check=True,
                       capture_output=True)
        deb = next(into.glob(f"{package}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def _clean(text: str) -> str:
    text = html.unescape(text).replace("\xa0", " ").replace("¶", "")
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paras if p)


class _Sections(HTMLParser):
    """Splits the main content of an HTML page into (heading level, heading, body text) by
    h1-h4.  Sphinx pages: only ``<div role="main">`` (no sidebars, no navigation)."""

    BLOCK = frozenset({"p", "pre", "li", "dt", "dd", "div", "table", "tr", "blockquote",
                       "section", "br"})

    def __init__(self, main_only: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[list[object]] = []
        self._heading: int | None = None
        self._head_text: list[str] = []
        self._script = 0
        self._in_main = not main_only
        self._div_depth = 0
        self._main_depth = -1

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._script += 1
        if tag == "div":
            self._div_depth += 1
            if dict(attrs).get("role") == "main" and not self._in_main:
                self._in_main, self._main_depth = True, self._div_depth
        if not self._in_main:
            return
        if re.fullmatch(r"h[1-4]", tag):
            self._heading, self._head_text = int(tag[1]), []
        elif tag in self.BLOCK and self.sections:
            self.sections[-1][2] += "\n\n"  # type: ignore[operator]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._script = max(0, self._script - 1)
        if tag == "div":
            if self._div_depth == self._main_depth:
                self._in_main, self._main_depth = False, -1
            self._div_depth -= 1
        if self._heading is not None and tag == f"h{self._heading}":
            self.sections.append([self._heading, _clean("".join(self._head_text)), ""])
            self._heading = None

    def handle_data(self, data: str) -> None:
        if self._script or not self._in_main:
            return
        if self._heading is not None:
            self._head_text.append(data)
        elif self.sections:
            self.sections[-1][2] += data  # type: ignore[operator]


def html_sections(path: str, main_only: bool = True) -> list[tuple[int, str, str]]:
    parser = _Sections(main_only)
    parser.feed(Path(path).read_text(encoding="utf-8", errors="replace"))
    return [(int(lv), str(h), _clean(str(body))) for lv, h, body in parser.sections]


_POD_CODES = re.compile(r"[CBIFSEXZL]<<+\s(.*?)\s>>+|[CBIFSEXZL]<([^<>]*)>")


def _pod_text(text: str) -> str:
    for _ in range(4):  # nested formatting codes, innermost first
        text = _POD_CODES.sub(lambda m: (m.group(1) or m.group(2) or "").split("|")[0], text)
    text = re.sub(r"^=(over|back|item|begin|end|for|encoding|cut).*$", "", text, flags=re.M)
    return _clean(text)


def pod_sections(path: str, marker: str) -> list[tuple[str, str]]:
    """(heading, body) for every ``marker`` (``=head2``, ``=item``) of a POD file."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    parts = re.split(rf"^{marker}\s+(.*)$", text, flags=re.M)
    out = []
    for i in range(1, len(parts) - 1, 2):
        body = re.split(r"^=head[12]\s", parts[i + 1], flags=re.M)[0]
        out.append((_pod_text(parts[i]), _pod_text(body)))
    return out


def _doc_id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def _question(text: str) -> str:
    return re.sub(r"^\d+(\.\d+)*\.?\s+", "", text).strip()


def _add_question(questions: list[dict], corpus: list[dict], prefix: str, head: str,
                  body: str, qkey: str) -> None:
    """A question (its heading) and its answer (the section's text) as a relevant document."""
    doc = {"_id": _doc_id(prefix, head + body), "title": "", "text": body}
    corpus.append(doc)
    questions.append({"_id": _doc_id("q", qkey), "text": _question(head), "doc": doc["_id"]})


def python_faq(root: Path) -> tuple[list[dict], list[dict]]:
    base = glob.glob(str(root / "usr/share/doc/python3.11/html"))[0]
    questions, corpus = [], []
    for page in sorted(glob.glob(f"{base}/faq/*.html")):
        for _, head, body in html_sections(page):
            if head.endswith("?") and len(body) >= 40:
                _add_question(questions, corpus, "pyfaq", head, body, head + Path(page).name)
    distractors = []
    for page in sorted(glob.glob(f"{base}/library/*.html")):
        for _, head, body in html_sections(page):
            if len(body) >= 200 and not head.endswith("?"):
                distractors.append({"_id": _doc_id("pylib", Path(page).name + head + body),
                                    "title": head, "text": body[:4000]})
    random.Random(0).shuffle(distractors)
    return questions, corpus + distractors[:PY_DISTRACTORS]


def perl_faq(root: Path) -> tuple[list[dict], list[dict]]:
    pod = glob.glob(str(root / "usr/share/perl/*/pod"))[0]
    questions, corpus = [], []
    for n in range(1, 10):
        for head, body in pod_sections(f"{pod}/perlfaq{n}.pod", "=head2"):
            if head.endswith("?") and len(body) >= 40:
                _add_question(questions, corpus, "plfaq", head, body, f"{n}{head}")
    for name, marker in (("perlfunc", "=item"), ("perlop", "=head2"), ("perlsyn", "=head2"),
                         ("perlre", "=head2"), ("perlvar", "=item")):
        for head, body in pod_sections(f"{pod}/{name}.pod", marker):
            if len(body) >= 120:
                corpus.append({"_id": _doc_id("pldoc", name + head + body), "title": head,
                               "text": body[:4000]})
    return questions, corpus


def debian_faq(root: Path) -> tuple[list[dict], list[dict]]:
    base = glob.glob(str(root / "usr/share/doc/debian/FAQ"))[0]
    questions, corpus = [], []
    for page in sorted(glob.glob(f"{base}/*.en.html")):
        for _, head, body in html_sections(page, main_only=False):
            if head.endswith("?") and len(body) >= 40:
                _add_question(questions, corpus, "dbfaq", head, body, head + Path(page).name)
            elif len(body) >= 200 and not body.startswith("Table of Contents"):
                # chapter pages open with their questions listed: a copy of the queries
                corpus.append({"_id": _doc_id("dbdoc", Path(page).name + head + body),
                               "title": head,
                               "text": body})
    return questions, corpus


def _hash_order(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()


def render_man(path: str) -> str:
    """A man page as plain text (``groff -man -Tutf8``, overstrikes removed)."""
    raw = subprocess.run(["zcat", "-f", path], check=True, capture_output=True).stdout
    out = subprocess.run(["groff", "-t", "-man", "-Tutf8", "-rLL=100n", "-rHY=0"], input=raw,
                         check=True, capture_output=True).stdout
    return subprocess.run(["col", "-bx"], input=out, check=True,
                          capture_output=True).stdout.decode("utf-8", "replace")


def man_sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of a rendered page: headings start at column 0; the page's header and
    footer lines (``open(2) ... open(2)``) are dropped."""
    lines = text.splitlines()
    if lines:
        lines = lines[1:-1]
    out: list[tuple[str, str]] = []
    for line in lines:
        if line and not line[0].isspace():
            out.append((line.strip(), ""))
        elif out:
            out[-1] = (out[-1][0], out[-1][1] + line.strip() + "\n")
    return [(h, _clean(b)) for h, b in out]


def man_pages(root: Path) -> tuple[list[dict], list[dict]]:
    pages = sorted(glob.glob(str(root / "usr/share/man/man[1-8]/*")))
    by_query: dict[str, list[dict]] = {}
    corpus = []
    for page in pages:
        head = subprocess.run(["zcat", "-f", page], capture_output=True).stdout[:200]
        if head.lstrip().startswith(b".so "):
            continue  # a link to another page
        sections = man_sections(render_man(page))
        name = next((b for h, b in sections if h == "NAME"), "")
        m = re.match(r"^(.+?)\s+[-\u2010-\u2014]+\s+(.+)$", " ".join(name.split()))
        body = "\n\n".join(f"{h}\n\n{b}" for h, b in sections if h != "NAME" and b)
        if not m or len(body) < 200:
            continue
        doc = {"_id": _doc_id("man", Path(page).name + body), "title": "",
               "text": body[:4000]}
        corpus.append(doc)
        by_query.setdefault(m.group(2).strip().rstrip("."), []).append(doc)
    questions = [{"_id": _doc_id("q", query + docs[0]["_id"]), "text": query,
                  "doc": docs[0]["_id"]}
                 for query, docs in by_query.items()
                 if len(docs) == 1 and len(query.split()) >= 2]
    questions.sort(key=lambda q: _hash_order(q["_id"]))
    return questions[:KEYWORD_QUERIES], corpus


def translations(into: Path) -> Path:
    """Bookworm's ``Translation-en.xz``, checked against the SHA-256 its InRelease lists."""
    path = into / "Translation-en.xz"
    subprocess.run(["curl", "-sSf", "-o", str(path), TRANSLATIONS_URL], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != TRANSLATIONS_SHA256:
        raise SystemExit(f"{TRANSLATIONS_URL}: SHA-256 {digest}, expected "
                         f"{TRANSLATIONS_SHA256} (the release changed: update the pin)")
    return path


def package_descriptions(path: Path) -> list[tuple[str, str, str]]:
    """(package, synopsis, long description) of every record of a Translation file."""
    import lzma

    out = []
    for record in lzma.decompress(path.read_bytes()).decode("utf-8").split("\n\n"):
        m = re.search(r"^Package: (\S+)$", record, re.M)
        d = re.search(r"^Description-en: (.*)\n((?: .*\n?)*)", record, re.M)
        if not m or not d:
            continue
        paras = [" ".join(p.split()) for p in
                 re.split(r"^ \.$", d.group(2), flags=re.M)]
        out.append((m.group(1), d.group(1).strip(), "\n\n".join(p for p in paras if p)))
    return out


def debian_packages(root: Path) -> tuple[list[dict], list[dict]]:
    records = package_descriptions(translations(root.parent))
    synopses: dict[str, int] = {}
    longs: dict[str, int] = {}
    for _, syn, long in records:
        synopses[syn.lower()] = synopses.get(syn.lower(), 0) + 1
        longs[long] = longs.get(long, 0) + 1
    kept = [(pkg, syn, long) for pkg, syn, long in records
            if synopses[syn.lower()] == 1 and longs[long] == 1 and len(long.split()) >= 25
            and len(syn.split()) >= 2
            and not re.search(r"transitional|dummy|debug symbols", syn, re.I)]
    kept.sort(key=lambda r: _hash_order(r[0]))
    kept = kept[:PKG_DOCUMENTS]
    corpus = [{"_id": f"pkg-{pkg}", "title": pkg, "text": long} for pkg, _, long in kept]
    questions = [{"_id": _doc_id("q", pkg), "text": syn, "doc": f"pkg-{pkg}"}
                 for pkg, syn, _ in kept[:KEYWORD_QUERIES]]
    return questions, corpus


BUILDERS = {"python-faq": python_faq, "perl-faq": perl_faq, "debian-faq": debian_faq,
            "man-pages": man_pages, "debian-packages": debian_packages}


def split_of(qid: str) -> str:
    """``tune`` or ``test``: half the questions each, by a hash of the id."""
    return "tune" if int(hashlib.sha1(qid.encode()).hexdigest(), 16) % 2 == 0 else "test"


def write_set(name: str, questions: list[dict], corpus: list[dict], out: Path) -> dict:
    d = out / name
    (d / "qrels").mkdir(parents=True, exist_ok=True)
    seen_docs: set[str] = set()
    with (d / "corpus.jsonl").open("w") as f:
        for doc in corpus:
            if doc["_id"] not in seen_docs:
                seen_docs.add(doc["_id"])
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    seen_q: set[str] = set()
    kept = [q for q in questions if q["_id"] not in seen_q and not seen_q.add(q["_id"])]
    with (d / "queries.jsonl").open("w") as f:
        for q in kept:
            f.write(json.dumps({"_id": q["_id"], "text": q["text"]}, ensure_ascii=False) + "\n")
    counts = {"tune": 0, "test": 0}
    for split in ("tune", "test"):
        with (d / "qrels" / f"{split}.tsv").open("w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for q in kept:
                if split_of(q["_id"]) == split:
                    f.write(f"{q['_id']}\t{q['doc']}\t1\n")
                    counts[split] += 1
    return {"questions": len(kept), "documents": len(seen_docs), **counts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--sets", default=",".join(BUILDERS))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dask-rag-eval-") as tmp:
        for name in args.sets.split(","):
            work = Path(tmp) / name
            work.mkdir()
            root = unpack(PACKAGES[name], work)
            questions, corpus = BUILDERS[name](root)
            stats = write_set(name, questions, corpus, args.out)
            print(f"{name}: {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
