"""The built-in demo corpus: the Python standard library's own documentation.

Made at run time from the docstrings of the running interpreter's standard library — modules,
classes, methods and functions — so it exists on every machine and nothing is downloaded.
Each docstring is one :class:`Document` whose ``source`` is the object's dotted name
(``json.dumps``, ``collections.OrderedDict.move_to_end``) and whose text starts with that name.
"""

from __future__ import annotations

import importlib
import inspect
import io
import pkgutil
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

from dask_rag.corpus.loaders import Document

__all__ = ["DEMO_QUESTIONS", "stdlib_documents", "stdlib_module_names"]

# modules with side effects on import, GUI toolkits, tests, platform-specific or private ones
_SKIP_PREFIXES = ("_", "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo",
                  "test", "lib2to3", "ensurepip", "pydoc_data", "msilib", "winreg", "winsound",
                  "msvcrt", "nt", "xxsubtype", "xxlimited", "__phello__", "sre_", "idle",
                  "venv", "distutils", "unittest.test", "ctypes.test", "asyncio.__main__",
                  "encodings", "pip")
_MIN_DOC_CHARS = 40

#: sample questions used by ``dask-rag demo`` and the quickstart notebook
DEMO_QUESTIONS = (
    "How do I serialize a Python object to a JSON string?",
    "How can I sort a list in place?",
    "How do I read a CSV file row by row?",
    "What does functools.lru_cache do?",
    "How do I run a shell command and capture its output?",
)


def _skipped(name: str) -> bool:
    parts = name.split(".")
    return any(p.startswith(_SKIP_PREFIXES) for p in parts) or "test" in parts or \
        "tests" in parts


def stdlib_module_names(include_submodules: bool = True) -> list[str]:
    """Importable standard-library module names of this interpreter, sorted."""
    names = sorted(n for n in sys.stdlib_module_names if not _skipped(n))
    if not include_submodules:
        return names
    out = set(names)
    for name in names:
        mod = _import(name)
        if mod is None or not hasattr(mod, "__path__"):
            continue
        for info in pkgutil.iter_modules(mod.__path__, prefix=f"{name}."):
            if not _skipped(info.name) and info.name.count(".") == 1:
                out.add(info.name)
    return sorted(out)


def _import(name: str) -> Any:
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), \
                redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:
        return None


def _clean(doc: Any) -> str | None:
    if not isinstance(doc, str):
        return None
    text = inspect.cleandoc(doc).strip()
    return text if len(text) >= _MIN_DOC_CHARS else None


def _document(source: str, kind: str, doc: Any, module: str) -> Document | None:
    text = _clean(doc)
    if text is None:
        return None
    return Document(source=source, text=f"{source}\n\n{text}",
                    metadata={"kind": kind, "module": module, "lang": "en"})


def _members(module: Any, name: str) -> Iterator[Document]:
    doc = _document(name, "module", getattr(module, "__doc__", None), name)
    if doc:
        yield doc
    try:
        members = sorted(vars(module).items())
    except TypeError:
        return
    for attr, obj in members:
        if attr.startswith("_"):
            continue
        owner = getattr(obj, "__module__", None)
        if owner != name:
            continue  # re-exported from elsewhere: documented where it is defined
        if inspect.isclass(obj):
            cdoc = _document(f"{name}.{attr}", "class", obj.__dict__.get("__doc__"), name)
            if cdoc:
                yield cdoc
            for mname, meth in sorted(obj.__dict__.items()):
                if mname.startswith("_") or (not callable(meth) and not isinstance(
                        meth, (classmethod, staticmethod, property))):
                    continue
                target = meth.__func__ if isinstance(meth, (classmethod, staticmethod)) else meth
                mdoc = _document(f"{name}.{attr}.{mname}", "method",
                                 getattr(target, "__doc__", None), name)
                if mdoc:
                    yield mdoc
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            fdoc = _document(f"{name}.{attr}", "function", obj.__doc__, name)
            if fdoc:
                yield fdoc


def stdlib_documents(modules: Iterable[str] | None = None,
                     limit: int | None = None) -> list[Document]:
    """Docstrings of the standard library (or of ``modules``), one Document each.

    Deterministic for a given interpreter.  Duplicate texts (aliases) are kept once.
    """
    names = list(modules) if modules is not None else stdlib_module_names()
    docs: list[Document] = []
    seen_text: set[str] = set()
    seen_source: set[str] = set()
    for name in names:
        mod = _import(name)
        if mod is None:
            continue
        for doc in _members(mod, name):
            body = doc.text.split("\n\n", 1)[-1]
            if doc.source in seen_source or body in seen_text:
                continue
            seen_source.add(doc.source)
            seen_text.add(body)
            docs.append(doc)
            if limit is not None and len(docs) >= limit:
                return docs
    return docs
