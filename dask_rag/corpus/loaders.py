"""Document loaders: text, Markdown, reStructuredText, HTML, PDF, DOCX and JSONL files.

A :class:`Document` is one source of text with a stable ``doc_hash`` (content hash) that
incremental ingestion compares against the index.  Structured formats give a document
*sections* — the text under one heading (Markdown, DOCX, HTML: ``heading_path`` metadata such
as ``"Install > From source"``) or one page (PDF: ``page``, counted from 1) — and chunks never
cross a section, so each chunk carries the heading path or page it came from.

* Markdown: ATX (``#``) and setext headings, ignoring ``#`` lines inside fenced code;
* HTML: the main content extracted by trafilatura (navigation, footers and boilerplate
  dropped) as Markdown, then sectioned by its headings;
* PDF: pypdf's text of each page; DOCX: python-docx paragraphs, sectioned by the ``Heading N``
  and ``Title`` styles, then table text.

A file that cannot be read fails with :class:`~dask_rag.errors.InvalidInput` naming it and the
reason (binary or non-UTF-8 text, a truncated or encrypted PDF, a DOCX that decompresses past
:data:`MAX_DECOMPRESSED_BYTES`, invalid JSONL lines with their line number); ingestion reports
such files, skips them and goes on.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dask_rag.errors import InvalidInput

__all__ = ["MAX_DECOMPRESSED_BYTES", "SUPPORTED_SUFFIXES", "Document", "Section",
           "discover_files", "load_file", "load_paths", "markdown_sections"]

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".html", ".htm", ".jsonl", ".pdf",
                      ".docx")
MAX_FILE_BYTES = 64 << 20
#: a DOCX (a zip) whose members add up to more than this is refused (a zip bomb)
MAX_DECOMPRESSED_BYTES = 256 << 20
#: how heading paths are written in ``heading_path`` metadata
HEADING_SEP = " > "


@dataclass(frozen=True)
class Section:
    """The text under one heading, or of one page, with what says where it is."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Document:
    """A unit of source text: ``source`` names it (path, dotted name, JSONL id, row id).

    ``sections``, when a loader found structure, split ``text`` into the parts chunks must not
    cross; their metadata is added to the chunks' metadata.
    """

    source: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    sections: tuple[Section, ...] = ()

    @property
    def doc_hash(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(self.source.encode())
        h.update(b"\x00")
        h.update(self.text.encode())
        h.update(b"\x00")
        h.update(json.dumps(self.metadata, sort_keys=True, default=str).encode())
        for sec in self.sections:
            h.update(b"\x01")
            h.update(json.dumps(sec.metadata, sort_keys=True, default=str).encode())
            h.update(str(len(sec.text)).encode())
        return h.hexdigest()


def _document(source: str, sections: list[Section], meta: dict[str, Any]) -> list[Document]:
    sections = [s for s in sections if s.text.strip()]
    if not sections:
        return []
    text = "\n\n".join(s.text for s in sections)
    return [Document(source=source, text=text, metadata=meta, sections=tuple(sections))]


_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_EMPHASIS = re.compile(r"(?<![\w*])(\*\*|\*)(?=[^\s*])(.+?)(?<=[^\s*])\1(?![\w*])")


def markdown_sections(text: str) -> list[Section]:
    """Markdown split at its headings; each section starts with its heading's text and carries
    ``heading_path`` (the titles from the top level down), when under a heading."""
    lines = text.splitlines()
    path: list[tuple[int, str]] = []
    sections: list[Section] = []
    body: list[str] = []
    fence: str | None = None

    def flush() -> None:
        chunk = "\n".join(body).strip()
        if chunk:
            meta = {"heading_path": HEADING_SEP.join(t for _, t in path)} if path else {}
            sections.append(Section(chunk, meta))
        body.clear()

    def heading(level: int, title: str) -> None:
        flush()
        while path and path[-1][0] >= level:
            path.pop()
        title = title.strip()
        path.append((level, title))
        body.append(title)

    for i, line in enumerate(lines):
        m = _FENCE.match(line)
        if m:
            marker = m.group(1)[0] * 3
            fence = None if fence is not None and marker == fence else (fence or marker)
            body.append(line)
            continue
        if fence is None:
            atx = _ATX.match(line)
            if atx and atx.group(2).strip():
                heading(len(atx.group(1)), atx.group(2))
                continue
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if line.strip() and _SETEXT.match(nxt) and not _SETEXT.match(line) and \
                    (not body or not body[-1].strip()):
                heading(1 if nxt.strip()[0] == "=" else 2, line)
                continue
            if _SETEXT.match(line) and body and body[-1] == (path[-1][1] if path else None):
                continue  # the underline of the setext heading just taken
        body.append(line)
    flush()
    return sections


def _read_bytes(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InvalidInput(f"{path}: file is {size} bytes, more than {MAX_FILE_BYTES}")
        return path.read_bytes()
    except PermissionError:
        raise InvalidInput(f"{path}: permission denied (cannot read the file)") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def _load_pdf(path: Path) -> list[Section]:
    import io

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    data = _read_bytes(path)
    if not data.startswith(b"%PDF-"):
        raise InvalidInput(f"{path}: not a PDF file (no %PDF- header)")
    if b"%%EOF" not in data[-2048:]:
        raise InvalidInput(f"{path}: truncated PDF (no %%EOF marker at the end)")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            raise InvalidInput(f"{path}: the PDF is encrypted")
        return [Section(page.extract_text() or "", {"page": n})
                for n, page in enumerate(reader.pages, start=1)]
    except InvalidInput:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise InvalidInput(f"{path}: unreadable PDF ({type(exc).__name__}: {exc})") from None


def _load_docx(path: Path) -> list[Section]:
    import io

    data = _read_bytes(path)  # read once: the size checks and python-docx share the bytes
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            total = sum(info.file_size for info in zf.infolist())
    except zipfile.BadZipFile:
        raise InvalidInput(f"{path}: not a DOCX file (not a zip archive)") from None
    if total > MAX_DECOMPRESSED_BYTES:
        raise InvalidInput(f"{path}: the DOCX decompresses to {total} bytes, more than "
                           f"the limit of {MAX_DECOMPRESSED_BYTES}")
    import docx

    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:  # python-docx raises many kinds for broken packages
        raise InvalidInput(f"{path}: unreadable DOCX ({type(exc).__name__}: {exc})") from None
    lines: list[str] = []
    for para in document.paragraphs:
        style = (para.style.name if para.style is not None else "") or ""
        text = para.text.strip()
        if not text:
            lines.append("")
            continue
        level = 1 if style == "Title" else (
            int(style.split()[-1]) if style.startswith("Heading") and
            style.split()[-1].isdigit() else 0)
        lines.extend(["", "#" * min(6, level) + " " + text, ""] if level else [text, ""])
    for table in document.tables:
        for row in table.rows:
            lines.append(" | ".join(cell.text.strip() for cell in row.cells))
        lines.append("")
    return markdown_sections("\n".join(lines))


def _load_html(path: Path, text: str) -> tuple[list[Section], dict[str, Any]]:
    meta: dict[str, Any] = {}
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    if parser.title:
        meta["title"] = parser.title
    try:
        import trafilatura
    except ImportError:  # plain text of the whole page
        return [Section(parser.text())], meta
    main = trafilatura.extract(text, output_format="markdown", include_comments=False,
                               include_tables=True, include_formatting=True,
                               favor_recall=True, with_metadata=False)
    if not main or not main.strip():
        return [Section(parser.text())], meta  # too little for an extractor: keep it all
    # the headings structure the sections; bold/italic markers are only noise to an encoder
    return [Section(_EMPHASIS.sub(r"\2", sec.text), sec.metadata)
            for sec in markdown_sections(main)], meta


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page (scripts and styles dropped, blocks become paragraphs)."""

    _BLOCK: ClassVar[frozenset[str]] = frozenset({
        "p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "pre", "section",
              "article", "blockquote", "dd", "dt"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self.title: str | None = None
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "noscript"):
            self._skip += 1
        if tag == "title":
            self._in_title = True
        if tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "noscript") and self._skip:
            self._skip -= 1
        if tag == "title":
            self._in_title = False
        if tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title = (self.title or "") + data.strip()
            return
        if not self._skip:
            self.parts.append(data)

    def text(self) -> str:
        raw = "".join(self.parts)
        paragraphs = [" ".join(p.split()) for p in raw.split("\n\n")]
        return "\n\n".join(p for p in paragraphs if p)


def _read_text(path: Path) -> str:
    data = _read_bytes(path)
    if b"\x00" in data[:8192]:
        raise InvalidInput(f"{path}: looks like a binary file (NUL bytes), not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path}: not valid UTF-8 text (byte {exc.start}); binary file?"
                           ) from None


def iter_jsonl_objects(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; errors name the file and the line."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise InvalidInput(f"{path}:{lineno}: each line must be a JSON object")
        yield lineno, obj


def _load_jsonl(path: Path, text: str) -> Iterator[Document]:
    for lineno, obj in iter_jsonl_objects(path, text):
        body = obj.get("text")
        if not isinstance(body, str):
            raise InvalidInput(f"{path}:{lineno}: missing string field 'text'")
        meta = obj.get("metadata", {})
        if not isinstance(meta, dict):
            raise InvalidInput(f"{path}:{lineno}: 'metadata' must be an object")
        doc_id = obj.get("id")
        if doc_id is not None and not isinstance(doc_id, (str, int)):
            raise InvalidInput(f"{path}:{lineno}: 'id' must be a string or an integer")
        source = f"{path}#{doc_id}" if doc_id is not None else f"{path}:{lineno}"
        yield Document(source=source, text=body, metadata=dict(meta))


def load_file(path: str | os.PathLike[str]) -> list[Document]:
    """The documents of one file (one per file, or one per line for JSONL)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise InvalidInput(f"{p}: unsupported file type {suffix!r}; supported: "
                           f"{', '.join(SUPPORTED_SUFFIXES)}")
    meta: dict[str, Any] = {"format": suffix.lstrip(".")}
    if suffix == ".pdf":
        return _document(str(p), _load_pdf(p), meta)
    if suffix == ".docx":
        return _document(str(p), _load_docx(p), meta)
    text = _read_text(p)
    if suffix == ".jsonl":
        return list(_load_jsonl(p, text))
    if suffix in (".html", ".htm"):
        sections, extra = _load_html(p, text)
        return _document(str(p), sections, {**meta, **extra})
    if suffix in (".md", ".markdown"):
        return _document(str(p), markdown_sections(text), meta)
    return [Document(source=str(p), text=text, metadata=meta)] if text.strip() else []


def discover_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files to ingest: explicit files as given, directories walked for supported suffixes."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise InvalidInput(f"{p}: no such file or directory")
        if p.is_file():
            if p.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise InvalidInput(f"{p}: unsupported file type {p.suffix!r}; supported: "
                                   f"{', '.join(SUPPORTED_SUFFIXES)}")
            found.append(p.absolute())
            continue
        before = len(found)
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                fp = Path(root) / name
                if fp.suffix.lower() in SUPPORTED_SUFFIXES:
                    found.append(fp.absolute())
        if len(found) == before:
            raise InvalidInput(f"{p}: directory contains no supported files "
                               f"({', '.join(SUPPORTED_SUFFIXES)})")
    return sorted(set(found))


def load_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Document]:
    """All documents under ``paths`` (read in this process; ingestion reads on workers)."""
    return [doc for f in discover_files(paths) for doc in load_file(f)]
