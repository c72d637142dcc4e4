"""The filter language: which chunks a search may return, evaluated inside each shard.

One JSON form everywhere (Python, CLI ``--filter``, HTTP ``"filter"``)::

    {"and": [F, ...]}   {"or": [F, ...]}   {"not": F}
    {"field": "lang", "eq": "en"}                      metadata equality (string, number, bool)
    {"field": "year", "in": [2023, 2024]}              membership
    {"field": "year", "range": {"gte": 2020, "lt": 2025}}   numbers, or strings (lexicographic)
    {"source_prefix": "docs/api/"}                     the chunk's source starts with it
    {"metadata": {"lang": "en", "draft": false}}       shorthand: an "and" of equalities

``source_prefix`` and ``metadata`` may share one object (the form filters had before the
language).  A field a chunk lacks matches no ``eq``/``in``/``range`` (and so every ``not`` of
one).  A shard turns a filter into the ids it allows — a boolean mask over its records computed
with numpy and pyarrow, the metadata columns parsed once per shard and cached — and faiss and
BM25 search only those ids, so a filtered search still returns ``k`` hits whenever ``k``
chunks match.  Malformed filters are refused before any work starts, naming the path of the bad
node (``filter.and.1.range``).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from dask_rag.errors import InvalidInput

__all__ = ["MAX_FILTER_DEPTH", "MetadataColumns", "SearchFilter", "describe_validation_error",
           "parse_filter"]

#: filters nest at most this deep (a request is not a place for a program)
MAX_FILTER_DEPTH = 16
#: at most this many values in one ``in``, and children in one ``and``/``or``
MAX_FILTER_ITEMS = 1024

Scalar = StrictBool | StrictInt | StrictFloat | Annotated[StrictStr, Field(max_length=1024)]
Bound = StrictInt | StrictFloat | Annotated[StrictStr, Field(max_length=1024)]


class Range(BaseModel):
    """Bounds of a ``range`` filter: all numbers or all strings; at least one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gt: Bound | None = None
    gte: Bound | None = None
    lt: Bound | None = None
    lte: Bound | None = None

    @model_validator(mode="after")
    def _check(self) -> Range:
        bounds = [b for b in (self.gt, self.gte, self.lt, self.lte) if b is not None]
        if not bounds:
            raise ValueError("a range needs at least one of gt, gte, lt, lte")
        kinds = {isinstance(b, str) for b in bounds}
        if len(kinds) > 1:
            raise ValueError("range bounds must be all numbers or all strings")
        if any(isinstance(b, float) and not math.isfinite(b) for b in bounds):
            raise ValueError("range bounds must be finite")
        return self

    @property
    def on_strings(self) -> bool:
        return any(isinstance(b, str) for b in (self.gt, self.gte, self.lt, self.lte))


class SearchFilter(BaseModel):
    """One node of a filter tree (see the module docstring for the forms)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    and_: tuple[SearchFilter, ...] | None = Field(None, alias="and", max_length=MAX_FILTER_ITEMS)
    or_: tuple[SearchFilter, ...] | None = Field(None, alias="or", max_length=MAX_FILTER_ITEMS)
    not_: SearchFilter | None = Field(None, alias="not")
    field: Annotated[StrictStr, Field(min_length=1, max_length=256)] | None = None
    eq: Scalar | None = None
    in_: tuple[Scalar, ...] | None = Field(None, alias="in", max_length=MAX_FILTER_ITEMS)
    range: Range | None = None
    source_prefix: StrictStr | None = None
    metadata: dict[Annotated[str, Field(max_length=256)], Scalar] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> SearchFilter:
        logic = [n for n, v in (("and", self.and_), ("or", self.or_), ("not", self.not_))
                 if v is not None]
        tests = [n for n, v in (("eq", self.eq), ("in", self.in_), ("range", self.range))
                 if v is not None]
        plain = [n for n, v in (("source_prefix", self.source_prefix),
                                ("metadata", self.metadata)) if v is not None]
        forms = len(logic) + (1 if self.field is not None or tests else 0) + (1 if plain else 0)
        if forms != 1 or len(logic) > 1:
            raise ValueError("a filter node is exactly one of: and, or, not, "
                             "{field + eq|in|range}, {source_prefix and/or metadata}")
        if (self.field is None) != (not tests) or len(tests) > 1:
            raise ValueError("'field' goes with exactly one of eq, in, range")
        if self.eq is not None and isinstance(self.eq, float) and not math.isfinite(self.eq):
            raise ValueError("eq must be finite")
        for children in (self.and_, self.or_):
            if children is not None and not children:
                raise ValueError("and/or need at least one filter")
        if self.depth() > MAX_FILTER_DEPTH:
            raise ValueError(f"filters nest at most {MAX_FILTER_DEPTH} deep")
        return self

    def depth(self) -> int:
        kids = [*(self.and_ or ()), *(self.or_ or ()), *((self.not_,) if self.not_ else ())]
        return 1 + max((k.depth() for k in kids), default=0)

    def fields(self) -> set[str]:
        """The metadata fields this filter reads."""
        out = {self.field} if self.field is not None else set()
        out |= set(self.metadata or {})
        for k in [*(self.and_ or ()), *(self.or_ or ()), *((self.not_,) if self.not_ else ())]:
            out |= k.fields()
        return out

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)

    # ---- evaluation --------------------------------------------------------------------------

    def mask(self, columns: MetadataColumns) -> npt.NDArray[np.bool_]:
        """Which of the shard's records pass (a boolean array over its rows)."""
        if self.and_ is not None:
            out = np.ones(columns.n, dtype=bool)
            for child in self.and_:
                out &= child.mask(columns)
            return out
        if self.or_ is not None:
            out = np.zeros(columns.n, dtype=bool)
            for child in self.or_:
                out |= child.mask(columns)
            return out
        if self.not_ is not None:
            return ~self.not_.mask(columns)
        if self.field is not None:
            return self._test(columns, self.field)
        out = np.ones(columns.n, dtype=bool)
        if self.source_prefix is not None:
            out &= columns.source_startswith(self.source_prefix)
        for key, value in (self.metadata or {}).items():
            out &= columns.equals(key, value)
        return out

    def _test(self, columns: MetadataColumns, field: str) -> npt.NDArray[np.bool_]:
        if self.eq is not None:
            return columns.equals(field, self.eq)
        if self.in_ is not None:
            out = np.zeros(columns.n, dtype=bool)
            for value in self.in_:
                out |= columns.equals(field, value)
            return out
        assert self.range is not None
        return columns.in_range(field, self.range)


def parse_filter(data: Any, where: str = "filter") -> SearchFilter | None:
    """A :class:`SearchFilter` from its JSON form (or a SearchFilter, or None); InvalidInput
    naming the path of the first bad node otherwise."""
    if data is None or isinstance(data, SearchFilter):
        return data
    if not isinstance(data, dict):
        raise InvalidInput(f"{where} must be an object, got {type(data).__name__}")
    try:
        return SearchFilter.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(describe_validation_error(exc, where)) from None
    except RecursionError:
        raise InvalidInput(f"{where} nests too deeply") from None


#: the names pydantic gives the members of a union in an error location
_UNION_TAGS = frozenset({"bool", "int", "float", "str", "constrained-str", "function-after",
                         "SearchFilter", "Range", "list[...]", "tuple[...]"})


#: plainer words for pydantic's most common complaints
_MESSAGES = {"extra_forbidden": "unknown field", "missing": "missing required field",
             "string_too_short": "is empty",
             "string_too_long": "is longer than the limit of {max_length} characters"}


def describe_validation_error(exc: ValidationError, root: str) -> str:
    """``root.path.to.node: message`` for the first errors pydantic reports, one per node
    (the members of a union that all failed are one error: "not one of the allowed types")."""
    seen: dict[str, str] = {}
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        union = bool(loc) and loc[-1] in _UNION_TAGS
        while loc and loc[-1] in _UNION_TAGS:
            loc.pop()
        path = ".".join([root, *loc])
        template = _MESSAGES.get(err["type"])
        msg = (template.format(**err.get("ctx", {})) if template
               else str(err["msg"]).removeprefix("Value error, "))
        if union:
            msg = seen.get(path, "must be a string, a number or a boolean")
        seen.setdefault(path, msg)
    items = list(seen.items())
    text = "; ".join(f"{path}: {msg}" for path, msg in items[:3])
    return text + (f" (and {len(items) - 3} more)" if len(items) > 3 else "")


class MetadataColumns:
    """A shard's records as columns a filter can test: the sources, and for each metadata
    field (parsed from the JSON column once, on first use) its values split by type."""

    def __init__(self, sources: list[str | None], metadata_json: list[str | None]) -> None:
        self.n = len(sources)
        self._sources = sources
        self._metadata_json = metadata_json
        self._parsed: list[dict[str, Any]] | None = None
        self._fields: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.int8],
                                      npt.NDArray[np.object_]]] = {}
        self._source_array: Any = None

    def source_startswith(self, prefix: str) -> npt.NDArray[np.bool_]:
        import pyarrow as pa
        import pyarrow.compute as pc

        if self._source_array is None:
            self._source_array = pa.array(self._sources, type=pa.string())
        return np.asarray(pc.fill_null(pc.starts_with(self._source_array, prefix), False),
                          dtype=bool)

    def _column(self, field: str) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int8],
                                           npt.NDArray[np.object_]]:
        """(numbers: NaN where absent or not a number, bools: -1 where absent or not a bool,
        strings: None where absent or not a string)."""
        col = self._fields.get(field)
        if col is not None:
            return col
        if self._parsed is None:
            self._parsed = [_parse(m) for m in self._metadata_json]
        nums = np.full(self.n, np.nan)
        bools = np.full(self.n, -1, dtype=np.int8)
        strs = np.full(self.n, None, dtype=object)
        for i, meta in enumerate(self._parsed):
            v = meta.get(field)
            if isinstance(v, bool):
                bools[i] = int(v)
            elif isinstance(v, (int, float)):
                nums[i] = float(v)
            elif isinstance(v, str):
                strs[i] = v
        col = (nums, bools, strs)
        self._fields[field] = col
        return col

    def equals(self, field: str, value: Any) -> npt.NDArray[np.bool_]:
        nums, bools, strs = self._column(field)
        if isinstance(value, bool):
            return bools == int(value)
        if isinstance(value, (int, float)):
            return nums == float(value)
        return np.asarray(strs == value, dtype=bool)

    def in_range(self, field: str, rng: Range) -> npt.NDArray[np.bool_]:
        nums, _, strs = self._column(field)
        if rng.on_strings:
            present = np.array([s is not None for s in strs], dtype=bool)
            values = np.where(present, strs, "")
            out = present.copy()
            for bound, op in ((rng.gt, np.greater), (rng.gte, np.greater_equal),
                              (rng.lt, np.less), (rng.lte, np.less_equal)):
                if bound is not None:
                    out &= op(values.astype(str), str(bound))
            return out
        out = ~np.isnan(nums)
        with np.errstate(invalid="ignore"):
            for bound, op in ((rng.gt, np.greater), (rng.gte, np.greater_equal),
                              (rng.lt, np.less), (rng.lte, np.less_equal)):
                if bound is not None:
                    out &= op(nums, float(bound))
        return out


def _parse(metadata_json: str | None) -> dict[str, Any]:
    if not metadata_json:
        return {}
    try:
        value = json.loads(metadata_json)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
