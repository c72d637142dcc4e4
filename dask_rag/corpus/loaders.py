"""Document loaders: text, Markdown, reStructuredText, HTML (as text) and JSONL files.

A :class:`Document` is one source of text with a stable ``doc_hash`` (content hash) that
incremental ingestion compares against the index.  Bad input fails with
:class:`~dask_rag.errors.InvalidInput` naming the file (and line, for JSONL) before anything is
written: unreadable or binary files, empty directories, invalid JSONL lines.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dask_rag.errors import InvalidInput

__all__ = ["SUPPORTED_SUFFIXES", "Document", "discover_files", "load_file", "load_paths"]

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".html", ".htm", ".jsonl")
MAX_FILE_BYTES = 64 << 20


@dataclass(frozen=True)
class Document:
    """A unit of source text: ``source`` names it (path, dotted name, JSONL id)."""

    source: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def doc_hash(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(self.source.encode())
        h.update(b"\x00")
        h.update(self.text.encode())
        h.update(b"\x00")
        h.update(json.dumps(self.metadata, sort_keys=True, default=str).encode())
        return h.hexdigest()


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
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InvalidInput(f"{path}: file is {size} bytes, more than {MAX_FILE_BYTES}")
        data = path.read_bytes()
    except PermissionError:
        raise InvalidInput(f"{path}: permission denied (cannot read the file)") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the file ({exc.strerror or exc})") from None
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
    text = _read_text(p)
    if suffix == ".jsonl":
        return list(_load_jsonl(p, text))
    meta: dict[str, Any] = {"format": suffix.lstrip(".")}
    if suffix in (".html", ".htm"):
        parser = _HTMLText()
        parser.feed(text)
        parser.close()
        text = parser.text()
        if parser.title:
            meta["title"] = parser.title
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
