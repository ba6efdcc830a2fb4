"""Parsing and validation of the ``/lines`` query parameters, as data-fair does it.

Modelled on data-fair's source (see docs/standin.md):

- ``api/src/misc/utils/find.ts`` ``pagination()``: size defaults to 12, ``skip = (page - 1) * size``
  and ``size + skip > 10000`` -> 400 ``"size + skip" cannot be more than 10000`` (checked first);
- ``api/src/datasets/es/commons.ts`` ``prepareQuery()``: ``size > maxPageSize (10000)`` -> 400,
  ``after`` parsed as ``JSON.parse("[" + after + "]")`` else 400 ``"after" parameter is malformed``,
  unknown ``select`` field -> 400 ``Impossible de sélectionner le champ X, il n'existe pas dans le jeu
  de données.``, unknown ``sort`` field -> 400 ``Impossible de trier sur le champ X, …``, ``qs`` parsed
  with a Lucene parser (syntax error -> 400 ``Impossible d'effectuer cette recherche, la syntaxe du
  paramètre "qs" n'est pas respectée : …``, unknown field -> 400 ``Impossible d'appliquer un filtre sur
  le champ X, il n'existe pas dans le jeu de données.``), ``<field>_eq/_in/_gte/…`` filter parameters;
- default order ``_i`` ascending (the tie-breaker that makes ``after`` pagination work).

The stand-in evaluates filters on ``code_departement_ban`` and ``date_reception_dpe`` only (the ones the
pipeline uses), which map to index ranges.  A well-formed query on another field, full-text ``q``,
another output ``format`` or another sort are answered 400 with a message that says the stand-in does
not implement it — never silently ignored.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field

from .. import departments
from .data import FIELDS, MOD_FIELD, SPAN_DAYS, _ORDINAL0

MAX_PAGE_SIZE = 10000  # config.elasticsearch.maxPageSize
DEFAULT_SIZE = 12
DEPT_FIELD = "code_departement_ban"
DATE_FIELD = "date_reception_dpe"
FILTER_SUFFIXES = ("_in", "_nin", "_eq", "_neq", "_gt", "_gte", "_lt", "_lte", "_starts", "_contains",
                   "_search", "_exists", "_nexists")
# sort keys data-fair accepts besides the schema fields
_EXTRA_SORT_KEYS = ("_key", "_count", "_time", "metric", "_i", "_rand", "_score")
#: the universe of a query: every department and ``none`` (the rows without code_departement_ban)
ALL_DEPS = frozenset(departments.ALL_CODES)
#: the rows that have a code_departement_ban (what a term on that field can ever match)
REAL_DEPS = frozenset(departments.ALL_DEPARTMENTS)
_NO_DAY = (-(10**9), 10**9)


class QueryError(Exception):
    """An answer other than 200: ``status`` and the text/plain ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def bad(message: str) -> QueryError:
    return QueryError(400, message)


def unsupported(what: str) -> QueryError:
    return QueryError(400, f"stand-in dpe03existant : {what} n'est pas implémenté par la stand-in locale "
                           f"(seuls les filtres sur {DEPT_FIELD} et {DATE_FIELD} le sont).")


# A "box" is one conjunction: (set of departments, first and last date_reception_dpe day, first and
# last date_derniere_modification_dpe day), days as offsets from START_DATE, inclusive.  A query is a
# union (list) of boxes.
Box = tuple[frozenset, int, int, int, int]


def _intersect(a: list[Box], b: list[Box]) -> list[Box]:
    out = []
    for deps_a, lo_a, hi_a, mlo_a, mhi_a in a:
        for deps_b, lo_b, hi_b, mlo_b, mhi_b in b:
            deps = deps_a & deps_b
            lo, hi = max(lo_a, lo_b), min(hi_a, hi_b)
            mlo, mhi = max(mlo_a, mlo_b), min(mhi_a, mhi_b)
            if deps and lo <= hi and mlo <= mhi:
                out.append((deps, lo, hi, mlo, mhi))
    return out


def _deps_box(deps) -> Box:
    return (frozenset(deps), *_NO_DAY, *_NO_DAY)


def _date_box(field_name: str, lo: int, hi: int) -> Box:
    if field_name == MOD_FIELD:
        return (ALL_DEPS, *_NO_DAY, lo, hi)
    return (ALL_DEPS, lo, hi, *_NO_DAY)


EVERYTHING: list[Box] = [_deps_box(ALL_DEPS)]
DATE_FIELDS = (DATE_FIELD, MOD_FIELD)


@dataclass
class LinesQuery:
    size: int = DEFAULT_SIZE
    skip: int = 0
    after: int | None = None  # the _i of the search_after values (the _rand tie-breaker only follows)
    select: list[str] | None = None  # None: every field but _geoshape/_geocorners
    descending: bool = False
    boxes: list[Box] = field(default_factory=lambda: list(EVERYTHING))
    count: bool = True  # track_total_hits
    params: list[tuple[str, str]] = field(default_factory=list)  # the query string, in order

    @property
    def output_fields(self) -> list[str]:
        """Source fields of each result in document order (``_score`` and ``_id`` handled apart)."""
        if self.select is None:
            return [f for f in FIELDS if f != "_id"]
        wanted = set(self.select)
        return [f for f in FIELDS if f in wanted and f != "_id"]

    @property
    def with_id(self) -> bool:
        return self.select is None or "_id" in self.select

    def matches_live(self, dep: str, rec_day: int, mod_day: int) -> bool:
        """Does a row of the tail (updated or inserted) match the query?"""
        for deps, lo, hi, mlo, mhi in self.boxes:
            if dep in deps and lo <= rec_day <= hi and mlo <= mod_day <= mhi:
                return True
        return False

    def index_ranges(self, dataset) -> dict[str, list[tuple[int, int]]]:
        """{department: sorted disjoint [lo, hi) base index ranges} of the matching rows (a base row's
        date_derniere_modification_dpe is its date_reception_dpe)."""
        per_dep: dict[str, list[tuple[int, int]]] = {}
        for deps, lo_day, hi_day, mlo, mhi in self.boxes:
            lo_day, hi_day = max(lo_day, mlo), min(hi_day, mhi)
            for dep in deps:
                lo, hi = dataset.index_range_days(dep, lo_day, hi_day)
                if hi > lo:
                    per_dep.setdefault(dep, []).append((lo, hi))
        for dep, ranges in per_dep.items():
            ranges.sort()
            merged = [ranges[0]]
            for lo, hi in ranges[1:]:
                if lo <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
                else:
                    merged.append((lo, hi))
            per_dep[dep] = merged
        return per_dep


def _day(value: str, param: str) -> int:
    text = value.strip()
    try:
        if len(text) == 10:
            d = _dt.date.fromisoformat(text)
        else:
            d = _dt.datetime.fromisoformat(text.replace("Z", "+00:00")).date()
    except ValueError:
        raise bad(f"failed to parse date field [{text}] with format [strict_date_optional_time||epoch_millis] ({param})") from None
    return d.toordinal() - _ORDINAL0


def _int_param(raw: str, name: str) -> int:
    # ASCII digits (parseInt reads no other script's); beyond 18 digits the value is only "too large"
    m = re.fullmatch(r"\s*(-?)([0-9]+)\s*", raw or "", re.ASCII)
    if not m:
        raise bad(f'"{name}" parameter is malformed')
    digits = m.group(2).lstrip("0") or "0"
    return int(m.group(1) + (digits if len(digits) <= 18 else "9" * 18))


def _json_values(text: str) -> list:
    """``JSON.parse("[" + text + "]")`` (ValueError as JSON.parse throws: NaN and Infinity are no JSON, an
    integer beyond 4300 digits and nesting beyond Python's recursion are reported as malformed too)."""
    try:
        return json.loads(f"[{text}]", parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse(params: list[tuple[str, str]], virtual: bool = False) -> LinesQuery:
    """Validate the query string of a /lines request (list of (name, value) in order).

    ``virtual``: the dataset is virtual, so data-fair sorts by ``_i`` then ``_rand`` (commons.ts: "_i is
    not a good enough tie-breaker in the case of virtual datasets") and ``after`` carries two values.
    """
    seen: dict[str, str] = {}
    for name, value in params:
        if name in seen:
            raise bad(f'"{name}" parameter is repeated')
        seen[name] = value
    q = LinesQuery(params=list(params))

    # 1. find.ts pagination(): default 12, size + skip <= 10000
    size = DEFAULT_SIZE
    if seen.get("size", "") != "":
        size = _int_param(seen["size"], "size")
    if size < 0:
        raise bad('"size" parameter is malformed')
    skip = 0
    if seen.get("page", "") != "":
        page = _int_param(seen["page"], "page")
        if page < 1:
            raise bad(f"[from] parameter cannot be negative, found [{(page - 1) * size}]")
        skip = (page - 1) * size
    if size + skip > MAX_PAGE_SIZE:
        raise bad(f'"size + skip" cannot be more than {MAX_PAGE_SIZE}')
    # 2. prepareQuery()
    if size > MAX_PAGE_SIZE:
        raise bad(f'"size" cannot be more than {MAX_PAGE_SIZE}')
    q.size = size
    if seen.get("after"):
        try:
            values = _json_values(seen["after"])
        except ValueError:
            raise bad('"after" parameter is malformed') from None
        n_sort = 2 if virtual else 1
        if len(values) != n_sort:
            raise bad(f"search_after has {len(values)} value(s) but sort has {n_sort}.")
        for name, v in zip(("_i", "_rand"), values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
                raise bad(f"Failed to parse search_after value for field [{name}]: {v!r}")
        q.after = int(values[0])
    else:
        q.skip = skip
    if "count" in seen:
        q.count = seen["count"] != "false"
    if q.after is not None:
        q.count = False  # track_total_hits=false on after= pages (commons.ts)

    select = seen.get("select")
    if select and select != "*":
        chosen = select.split(",")
        for key in chosen:
            if key not in FIELDS:
                raise bad(f"Impossible de sélectionner le champ {key}, il n'existe pas dans le jeu de données.")
        q.select = chosen

    sort = seen.get("sort")
    if sort:
        keys = sort.split(",")
        for s in keys:
            key = s[1:] if s.startswith("-") else s
            if key not in FIELDS and key not in _EXTRA_SORT_KEYS:
                raise bad(f"Impossible de trier sur le champ {key}, il n'existe pas dans le jeu de données.")
        if keys == ["_i"]:
            q.descending = False
        elif keys == ["-_i"]:
            q.descending = True
        else:
            raise unsupported(f'le tri "sort={sort}"')

    if seen.get("q"):
        raise unsupported('la recherche plein texte "q"')
    fmt = seen.get("format", "json")
    if fmt not in ("", "json"):
        raise unsupported(f'le format "{fmt}"')
    for name in ("collapse", "highlight", "bbox", "geo_distance", "xyz", "thumbnail", "date_match"):
        if seen.get(name):
            raise unsupported(f'le paramètre "{name}"')

    boxes = list(EVERYTHING)
    if seen.get("qs"):
        boxes = _intersect(boxes, parse_qs(seen["qs"]))
    for name, value in params:
        suffix = next((s for s in FILTER_SUFFIXES if name.endswith(s)), None)
        if suffix is None or name.startswith("_c_"):
            continue
        key = name[: -len(suffix)]
        if key not in FIELDS:
            raise bad(f"Impossible d'appliquer un filtre sur le champ {key}, il n'existe pas dans le jeu de données.")
        boxes = _intersect(boxes, _filter_param(name, key, suffix, value))
    q.boxes = boxes
    return q


def _filter_param(name: str, key: str, suffix: str, value: str) -> list[Box]:
    if suffix in ("_eq", "_neq", "_gt", "_gte", "_lt", "_lte") and not value:
        raise bad(f"Filtre {name} nécessite une valeur.")
    if key == DEPT_FIELD and suffix in ("_eq", "_neq", "_in", "_nin"):
        if suffix in ("_in", "_nin"):
            try:
                values = _json_values(value) if value.startswith('"') else [v for v in value.split(",") if v]
            except ValueError:
                raise bad(f'"{name}" parameter is malformed') from None
            if not values:
                raise bad(f"Filtre {name} nécessite une valeur.")
        else:
            values = [value]
        chosen = frozenset(str(v) for v in values) & REAL_DEPS
        if suffix in ("_neq", "_nin"):  # an ES must_not: rows without the field match it too
            chosen = ALL_DEPS - frozenset(str(v) for v in values)
        return [_deps_box(chosen)] if chosen else []
    if key in DATE_FIELDS and suffix in ("_eq", "_gt", "_gte", "_lt", "_lte"):
        d = _day(value, name)
        lo, hi = {"_eq": (d, d), "_gt": (d + 1, _NO_DAY[1]), "_gte": (d, _NO_DAY[1]),
                  "_lt": (_NO_DAY[0], d - 1), "_lte": (_NO_DAY[0], d)}[suffix]
        return [_date_box(key, lo, hi)]
    raise unsupported(f'le filtre "{name}"')


# ------------------------------------------------------------------------------------ Lucene qs
class _Syntax(Exception):
    pass


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<lpar>\() | (?P<rpar>\)) |
        (?P<and>AND\b|&&) | (?P<or>OR\b|\|\|) | (?P<not>NOT\b|!) |
        (?P<phrase>"(?:[^"\\]|\\.)*") |
        (?P<range>[\[{][^\]}]*[\]}]) |
        (?P<term>(?:[^\s()"\[\]{}:\\]|\\.)+) |
        (?P<colon>:)
    )""",
    re.VERBOSE,
)


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise _Syntax(f'Expected field or term but "{text[pos:pos + 1]}" found.')
        pos = m.end()
        kind = m.lastgroup
        if kind == "range" and '"' in m.group(kind):
            # lucene-query-parser (data-fair's checkQuery) accepts only unquoted terms as range bounds
            raise _Syntax('Expected "*", term or whitespace but "\\"" found.')
        tokens.append((kind, m.group(kind)))
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.tokens = _tokenize(text)
        self.pos = 0

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else (None, None)

    def take(self):
        tok = self.peek()
        self.pos += 1
        return tok

    def parse(self):
        node = self.or_expr()
        if self.pos != len(self.tokens):
            raise _Syntax(f'Expected end of input but "{self.peek()[1]}" found.')
        return node

    def or_expr(self):
        items = [self.and_expr()]
        while True:
            kind, _ = self.peek()
            if kind == "or":
                self.take()
                items.append(self.and_expr())
            elif kind in ("lpar", "phrase", "term", "not", "range"):
                items.append(self.and_expr())  # juxtaposition: default operator OR
            else:
                break
        return items[0] if len(items) == 1 else ("or", items)

    def and_expr(self):
        items = [self.unary()]
        while self.peek()[0] == "and":
            self.take()
            items.append(self.unary())
        return items[0] if len(items) == 1 else ("and", items)

    def unary(self):
        kind, _ = self.peek()
        if kind == "not":
            self.take()
            return ("not", self.unary())
        return self.primary()

    def primary(self, field_name: str | None = None):
        kind, value = self.take()
        if kind == "lpar":
            node = self.or_expr() if field_name is None else self.value_group(field_name)
            if self.take()[0] != "rpar":
                raise _Syntax('Expected ")" but end of input found.')
            return node
        if kind == "term" and self.peek()[0] == "colon":
            self.take()
            if field_name is not None:
                raise _Syntax('Expected term but ":" found.')
            name = value.replace("\\", "")
            nk, nv = self.peek()
            if nk == "lpar":
                return self.primary(name)
            if nk in ("term", "phrase", "range"):
                self.take()
                return ("field", name, nk, nv)
            raise _Syntax(f'Expected term but {"end of input" if nk is None else repr(nv)} found.')
        if kind in ("term", "phrase", "range"):
            return ("field", field_name or "<implicit>", kind, value)
        if kind is None:
            raise _Syntax("Expected field or term but end of input found.")
        raise _Syntax(f'Expected field or term but "{value}" found.')

    def value_group(self, name: str):
        items = [self.group_and(name)]
        while True:
            kind, _ = self.peek()
            if kind == "or":
                self.take()
                items.append(self.group_and(name))
            elif kind in ("term", "phrase", "range", "lpar", "not"):
                items.append(self.group_and(name))
            else:
                break
        return items[0] if len(items) == 1 else ("or", items)

    def group_and(self, name: str):
        items = [self.group_unary(name)]
        while self.peek()[0] == "and":
            self.take()
            items.append(self.group_unary(name))
        return items[0] if len(items) == 1 else ("and", items)

    def group_unary(self, name: str):
        if self.peek()[0] == "not":
            self.take()
            return ("not", self.group_unary(name))
        kind, value = self.peek()
        if kind == "lpar":
            self.take()
            node = self.value_group(name)
            if self.take()[0] != "rpar":
                raise _Syntax('Expected ")" but end of input found.')
            return node
        if kind in ("term", "phrase", "range"):
            self.take()
            return ("field", name, kind, value)
        raise _Syntax(f'Expected term but {"end of input" if kind is None else repr(value)} found.')


def parse_qs(text: str) -> list[Box]:
    """The rows a Lucene ``qs`` selects, as a union of boxes; 400 on bad syntax or unknown fields."""
    try:
        tree = _Parser(text.replace('\\"', "")).parse()
        _check_fields(tree)
        return _boxes(tree)
    except (_Syntax, RecursionError) as exc:
        # nesting beyond Python's recursion: data-fair's parser (PEG.js) overflows its stack too, inside
        # checkQuery's try (commons.ts), which answers 400 with the RangeError's message
        why = "Maximum call stack size exceeded" if isinstance(exc, RecursionError) else exc
        raise bad(f'Impossible d\'effectuer cette recherche, la syntaxe du paramètre "qs" n\'est pas respectée : '
                  f'requête = "{text}", erreur = "{why}"') from None


def _check_fields(node) -> None:
    if node[0] in ("and", "or"):
        for child in node[1]:
            _check_fields(child)
    elif node[0] == "not":
        _check_fields(node[1])
    else:
        name = node[1]
        if name == "_exists_" and _unquote(node[2], node[3]).replace("\\", "") not in FIELDS:
            # commons.ts checkQuery names the pseudo-field in this message, not the missing column
            raise bad(f"Impossible d'appliquer un filtre sur le champ {name}, il n'existe pas dans le jeu de données.")
        if name not in ("<implicit>", "_exists_") and name not in FIELDS:
            raise bad(f"Impossible d'appliquer un filtre sur le champ {name}, il n'existe pas dans le jeu de données.")


def _unquote(kind: str, value: str) -> str:
    if kind == "phrase":
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return re.sub(r"\\(.)", r"\1", value)


def _boxes(node) -> list[Box]:
    op = node[0]
    if op == "and":
        out = list(EVERYTHING)
        for child in node[1]:
            out = _intersect(out, _boxes(child))
        return out
    if op == "or":
        out = []
        for child in node[1]:
            out.extend(_boxes(child))
        return out
    if op == "not":
        # only the negation of department clauses (no date part) is evaluated: its complement is
        # exact, rows without code_departement_ban included (an ES must_not)
        inner = _boxes(node[1])
        if any(tuple(box[1:]) != (*_NO_DAY, *_NO_DAY) for box in inner):
            raise unsupported('la négation (NOT) d\'une condition de date dans "qs"')
        covered = frozenset().union(*(box[0] for box in inner)) if inner else frozenset()
        rest = ALL_DEPS - covered
        return [_deps_box(rest)] if rest else []
    _, name, kind, value = node
    if name == "<implicit>":
        raise unsupported('une recherche sans champ dans "qs"')
    if name == "_exists_":
        target = _unquote(kind, value).replace("\\", "")
        if target == DEPT_FIELD:
            return [_deps_box(REAL_DEPS)]
        raise unsupported(f'"_exists_:{target}" dans "qs"')
    if name == DEPT_FIELD:
        if kind == "range":
            raise unsupported(f'un intervalle sur {DEPT_FIELD}')
        text = _unquote(kind, value)
        if kind == "term" and any(c in text for c in "*?~^"):
            raise unsupported(f'les jokers ou opérateurs dans "{text}"')
        return [_deps_box([text])] if text in REAL_DEPS else []
    if name in DATE_FIELDS:
        if kind == "range":
            inner = value[1:-1]
            parts = re.split(r"\s+TO\s+", inner.strip())
            if len(parts) != 2:
                raise bad(f'Impossible d\'effectuer cette recherche, la syntaxe du paramètre "qs" n\'est pas '
                          f'respectée : requête = "{value}", erreur = "Expected \\"TO\\" but \\"{inner}\\" found."')
            lo_txt, hi_txt = (p.strip() for p in parts)
            lo = _NO_DAY[0] if lo_txt == "*" else _day(lo_txt, name) + (0 if value[0] == "[" else 1)
            hi = _NO_DAY[1] if hi_txt == "*" else _day(hi_txt, name) - (0 if value[-1] == "]" else 1)
            return [_date_box(name, lo, hi)] if lo <= hi else []
        text = _unquote(kind, value)
        for op in (">=", "<=", ">", "<"):
            if text.startswith(op):
                d = _day(text[len(op):], name)
                lo, hi = {">=": (d, _NO_DAY[1]), ">": (d + 1, _NO_DAY[1]),
                          "<=": (_NO_DAY[0], d), "<": (_NO_DAY[0], d - 1)}[op]
                return [_date_box(name, lo, hi)]
        d = _day(text, name)
        return [_date_box(name, d, d)]
    raise unsupported(f'le filtre "qs" sur le champ {name}')


def day_in_span(day: int) -> bool:
    return 0 <= day < SPAN_DAYS
