#!/usr/bin/env python
"""Build the real-question evaluation sets (BEIR layout) from Debian documentation packages.

Three FAQs that nobody on this project wrote, each question a real user's question as its
maintainers wrote it down, its relevant document the FAQ's own answer:

* ``python-faq`` — the Python FAQ (``python3.11-doc``: ``html/faq/*.html``); distractors:
  sections of the Python library reference of the same package;
* ``perl-faq`` — perlfaq1-9 (``perl-doc``: ``pod/perlfaq*.pod``); distractors: the
  entries of ``perlfunc`` and the sections of ``perlop``, ``perlsyn``, ``perlre``, ``perlvar``;
* ``debian-faq`` — the Debian FAQ (``debian-faq``: ``FAQ/*.en.html``); distractors: none
  but the other answers (120 questions: a small third domain, system administration).

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
PACKAGES = {"python-faq": "python3.11-doc", "perl-faq": "perl-doc", "debian-faq": "debian-faq"}
#: distractor sections kept for python-faq (a deterministic sample of the library reference)
PY_DISTRACTORS = 2500


def unpack(package: str, into: Path) -> Path:
    """``apt-get download`` + ``dpkg-deb -x``: the package's files under ``into``."""
    subprocess.run(["apt-get", "download", "-qq", package], cwd=into, check=True,
                   capture_output=True)
    deb = next(into.glob(f"{package}_*.deb"))
    root = into / package
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


BUILDERS = {"python-faq": python_faq, "perl-faq": perl_faq, "debian-faq": debian_faq}


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
            root = unpack(PACKAGES[name], Path(tmp))
            questions, corpus = BUILDERS[name](root)
            stats = write_set(name, questions, corpus, args.out)
            print(f"{name}: {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
