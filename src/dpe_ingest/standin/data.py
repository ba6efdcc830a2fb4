"""Deterministic synthetic ``dpe03existant`` rows, generated lazily.

Row ``i`` of department ``d`` is a pure function of ``(seed, d, i, count(d), malformed_rate)``: nothing
is stored, so a department of millions of rows costs no memory, and a row can be produced in O(1) from
any position (the stand-in's cursor pagination jumps straight to its position).

Ordering and the ``_i`` line number
    data-fair sorts ``/lines`` by ``_i`` (the line number in the source file) when no ``sort`` is given.
    The real file mixes departments; here departments are interleaved round-robin:
    ``_i = index * N + position(department)`` where ``N = len(ALL_DEPARTMENTS)``.  Inside a department,
    ``date_reception_dpe`` is non-decreasing with the index, so a date range is an index range computed
    exactly by arithmetic (no scan).

Malformed rows (``malformed_rate > 0``)
    A deterministic subset of rows is damaged: either ``numero_dpe`` is missing (the key is absent, as
    Elasticsearch omits missing fields) or ``date_reception_dpe`` is the unparsable ``"not-a-date"``.
    Filtering and ordering still use the row's position, so a damaged row is returned by the same
    queries as its healthy twin.  ``malformed_kind(dep, i)`` tells which rows are damaged.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import threading
from typing import Iterator, Mapping

from .. import departments

M64 = (1 << 64) - 1
START_DATE = _dt.date(2021, 7, 1)  # the 2021 DPE method (dataset dpe03existant) starts here
END_DATE = _dt.date(2025, 12, 31)
SPAN_DAYS = (END_DATE - START_DATE).days + 1
# day strings of the span and of ~11 years after it (the days of live changes: inserts, updates)
_DAY_STR = [(START_DATE + _dt.timedelta(days=k)).isoformat() for k in range(SPAN_DAYS + 4000)]
#: first ``_i`` of a virtual dataset (data-fair derives it from a timestamp: 33554660655676-like)
VIRTUAL_I0 = 33_554_432_000_000
MOD_FIELD = "date_derniere_modification_dpe"
_ORDINAL0 = START_DATE.toordinal()

#: every code the stand-in serves rows for: the departments, then ``none`` (rows without
#: code_departement_ban).  Positions of the historical 102 codes come first and never move, so the
#: ``_i`` of a row does not depend on the codes added later (977, 978, 988, none).
CODES: tuple[str, ...] = departments.ALL_CODES
_POSITION_ORDER = ([d for d in departments.ALL_DEPARTMENTS if d not in ("977", "978", "988")]
                   + ["977", "978", "988", departments.NONE])
DEPARTMENT_POSITION: dict[str, int] = {d: k for k, d in enumerate(_POSITION_ORDER)}
N_DEPARTMENTS = len(_POSITION_ORDER)
assert set(_POSITION_ORDER) == set(CODES)

# Energy label distribution of existing dwellings (dpe03existant), rounded: A+B about 4-5 % (ADEME
# observatoire DPE), F about 10 %, G about 7 % (DPE logements existants, July 2021 - Sept 2023).
ETIQUETTE_WEIGHTS = (("A", 1.5), ("B", 3.0), ("C", 19.0), ("D", 34.0), ("E", 25.5), ("F", 10.0), ("G", 7.0))
# kWh primary energy / m2 / year bands of the 2021 DPE scale, used for conso_5_usages_par_m2_ep.
_CONSO_BANDS = {"A": (35, 69), "B": (70, 110), "C": (111, 180), "D": (181, 250), "E": (251, 330),
                "F": (331, 420), "G": (421, 650)}
_GES_LABELS = "ABCDEFG"
_TYPES = ("appartement", "appartement", "maison", "maison", "maison", "appartement", "immeuble", "maison")
_PERIODS = (("avant 1948", 1850, 1947), ("1948-1974", 1948, 1974), ("1975-1977", 1975, 1977),
            ("1978-1982", 1978, 1982), ("1983-1988", 1983, 1988), ("1989-2000", 1989, 2000),
            ("2001-2005", 2001, 2005), ("2006-2012", 2006, 2012), ("2013-2021", 2013, 2021))
_ENERGIES = ("Électricité", "Électricité", "Gaz naturel", "Gaz naturel", "Fioul domestique",
             "Bois – Bûches", "Réseau de Chauffage urbain", "GPL")
_NAME_STEMS = ("Saint-Martin", "Saint-Pierre", "Sainte-Marie", "Beaumont", "Villeneuve", "Montagne",
               "Fontaine", "Belleville", "Champagne", "Châteauneuf", "Rivière", "Le Mesnil", "La Roche",
               "Les Granges", "Bourg", "Plaisance", "Mont-Royal", "Bellevue", "Clairefontaine", "Valence",
               "Pont-Neuf", "Sauveterre", "Montfort", "Lacroix", "Les Ormes", "Marcilly", "Aubigny",
               "Vernon", "Laval", "Brie")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_NUM_MULT = 3_999_971  # odd, not a multiple of 5: a bijection of [0, 10**7)
_NUM_ADD = 1_234_567

FIELDS: tuple[str, ...] = (
    "numero_dpe", "date_etablissement_dpe", "date_reception_dpe", "date_derniere_modification_dpe",
    "etiquette_dpe", "etiquette_ges",
    "conso_5_usages_par_m2_ep", "emission_ges_5_usages_par_m2", "type_batiment", "periode_construction",
    "annee_construction", "surface_habitable_logement", "type_energie_principale_chauffage",
    "code_postal_ban", "code_insee_ban", "nom_commune_ban", "code_departement_ban",
    "_i", "_rand", "_id",
)

# The schema as GET /datasets/dpe03existant publishes it (a subset of the real columns + calculated ones).
SCHEMA: list[dict] = [
    {"key": "numero_dpe", "type": "string", "title": "N°DPE", "x-originalName": "numero_dpe"},
    {"key": "date_etablissement_dpe", "type": "string", "format": "date", "title": "Date_établissement_DPE"},
    {"key": "date_reception_dpe", "type": "string", "format": "date", "title": "Date_réception_DPE"},
    {"key": "date_derniere_modification_dpe", "type": "string", "format": "date",
     "title": "Date_dernière_modification_DPE"},
    {"key": "etiquette_dpe", "type": "string", "title": "Etiquette_DPE"},
    {"key": "etiquette_ges", "type": "string", "title": "Etiquette_GES"},
    {"key": "conso_5_usages_par_m2_ep", "type": "number", "title": "Conso_5_usages_par_m²_é_primaire"},
    {"key": "emission_ges_5_usages_par_m2", "type": "number", "title": "Emission_GES_5_usages_par_m²"},
    {"key": "type_batiment", "type": "string", "title": "Type_bâtiment"},
    {"key": "periode_construction", "type": "string", "title": "Période_construction"},
    {"key": "annee_construction", "type": "integer", "title": "Année_construction"},
    {"key": "surface_habitable_logement", "type": "number", "title": "Surface_habitable_logement"},
    {"key": "type_energie_principale_chauffage", "type": "string", "title": "Type_énergie_principale_chauffage"},
    {"key": "code_postal_ban", "type": "string", "title": "Code_postal_(BAN)"},
    {"key": "code_insee_ban", "type": "string", "title": "Code_INSEE_(BAN)"},
    {"key": "nom_commune_ban", "type": "string", "title": "Nom__commune_(BAN)"},
    {"key": "code_departement_ban", "type": "string", "title": "N°_département_(BAN)"},
    {"key": "_i", "type": "integer", "title": "Numéro de ligne", "x-calculated": True},
    {"key": "_rand", "type": "integer", "title": "Nombre aléatoire", "x-calculated": True},
    {"key": "_id", "type": "string", "format": "uri-reference", "title": "Identifiant", "x-calculated": True},
]
assert tuple(f["key"] for f in SCHEMA) == FIELDS

MALFORMED_KINDS = ("missing_numero_dpe", "bad_date")


def _mix(x: int) -> int:
    """splitmix64 finaliser: a fast, well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _communes(dep: str) -> list[tuple[str, str, str]]:
    """(code_postal, code_insee, nom) of a few plausible communes of ``dep``."""
    h = _mix(hash_str(dep))
    out: list[tuple[str, str, str]] = []
    for k in range(40):
        h = _mix(h + k)
        if dep == "2A":  # Corse-du-Sud: 200xx / 201xx
            cp = f"20{(h >> 8) % 2}{(h >> 16) % 10}{(h >> 24) % 10 if k else 0}"
            insee = f"2A{(h >> 32) % 366 + 1:03d}"
        elif dep == "2B":  # Haute-Corse: 202xx / 206xx
            cp = f"20{2 if (h >> 8) % 3 else 6}{(h >> 16) % 10}{(h >> 24) % 10 if k else 0}"
            insee = f"2B{(h >> 32) % 366 + 1:03d}"
        elif dep == "977":  # Saint-Barthélemy: one commune
            cp, insee = "97133", "97701"
        elif dep == "978":  # Saint-Martin: one commune
            cp, insee = "97150", "97801"
        elif dep == departments.NONE:  # no BAN address at all: the address fields are absent
            cp, insee = "", ""
        elif len(dep) == 3:  # overseas: 971xx .. 976xx, Nouvelle-Calédonie 988xx
            cp = f"{dep}{(h >> 8) % 9}0" if k else f"{dep}00"
            insee = f"{dep}{(h >> 16) % 60 + 1:02d}"
        elif dep == "75":
            arr = (h >> 8) % 20 + 1
            cp = f"750{arr:02d}"
            insee = f"751{arr:02d}"
        else:
            cp = f"{dep}{((h >> 8) % 98 + 1) * 10:03d}" if k else f"{dep}000"
            insee = f"{dep}{(h >> 32) % 600 + 1:03d}"
        name = _NAME_STEMS[(h >> 40) % len(_NAME_STEMS)]
        if (h >> 48) % 3 == 0:
            name = f"{name}-sur-{_NAME_STEMS[(h >> 52) % len(_NAME_STEMS)].split('-')[-1]}"
        out.append((cp, insee, name))
    return out


def hash_str(s: str) -> int:
    """A stable (process-independent) 64-bit hash of a short string."""
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def _cumulative(weights) -> tuple[tuple[float, str], ...]:
    total = sum(w for _, w in weights)
    acc, out = 0.0, []
    for label, w in weights:
        acc += w / total
        out.append((acc, label))
    return tuple(out)


_ETIQ_CUM = _cumulative(ETIQUETTE_WEIGHTS)


def _etiquette(u: float) -> str:
    for bound, label in _ETIQ_CUM:
        if u < bound:
            return label
    return "G"


# 10 000 precomputed labels: a table lookup is faster than walking the cumulative distribution.
_ETIQ_TABLE = [_etiquette((k + 0.5) / 10000) for k in range(10000)]


class Dataset:
    """The synthetic dataset: ``rows_per_department`` rows in each department of ALL_DEPARTMENTS.

    ``rows_per_department`` is one count for every department, or a mapping ``{department: count}``;
    departments absent from the mapping get ``default_rows`` (1000 unless given).  The rows without a
    department (pseudo-department ``none``: no code_departement_ban, no BAN address) number
    ``rows_without_department`` (0 unless given, or a ``"none"`` key of the mapping); only
    ``qs=NOT _exists_:code_departement_ban`` reaches them, as in data-fair.
    """

    dataset_id = "dpe03existant"

    def __init__(
        self,
        rows_per_department: int | Mapping[str, int] = 1000,
        seed: int = 1,
        malformed_rate: float = 0.0,
        default_rows: int | None = None,
        rows_without_department: int | None = None,
        virtual: bool = False,
    ):
        if not 0.0 <= float(malformed_rate) <= 1.0:
            raise ValueError(f"malformed_rate={malformed_rate!r} must be between 0 and 1")
        self.seed = int(seed)
        self.malformed_rate = float(malformed_rate)
        self._malformed_threshold = int(self.malformed_rate * (1 << 53))
        if isinstance(rows_per_department, Mapping):
            default = 1000 if default_rows is None else int(default_rows)
            counts = {d: default for d in departments.ALL_DEPARTMENTS}
            counts[departments.NONE] = 0
            for dep, n in rows_per_department.items():
                counts[departments.normalize(dep)] = int(n)
        else:
            counts = {d: int(rows_per_department) for d in departments.ALL_DEPARTMENTS}
            counts[departments.NONE] = 0
        if rows_without_department is not None:
            counts[departments.NONE] = int(rows_without_department)
        for dep, n in counts.items():
            if n < 0:
                raise ValueError(f"rows for department {dep} must be >= 0, got {n}")
        self.counts: dict[str, int] = counts
        self._dep_seed = {d: _mix(self.seed * 0x1000193 ^ hash_str(d)) for d in CODES}
        self._communes = {d: _communes(d) for d in CODES}
        self._num_offset = {d: h % 10_000_000 for d, h in self._dep_seed.items()}
        #: how many rows were generated so far (all threads; approximate under concurrency)
        self.generated_rows = 0
        self._init_live(virtual)

    # ---------------------------------------------------------------- counting and positions
    def count(self, department: str | None = None, date_from=None, date_to=None) -> int:
        """Rows of ``department`` (every row if None) with date_reception_dpe in [from, to]."""
        deps = CODES if department is None else (departments.normalize(department),)
        total = 0
        for dep in deps:
            lo, hi = self.index_range(dep, date_from, date_to)
            total += hi - lo
        return total

    @property
    def total(self) -> int:
        """Rows generated at the start (the base): the live count is ``live_total``."""
        return sum(self.counts.values())

    @property
    def live_total(self) -> int:
        with self.lock:
            return (self.total - len(self._hole_set)
                    + sum(1 for seq, key in enumerate(self._tail) if self._loc.get(key) == seq))

    def index_range(self, department: str, date_from=None, date_to=None) -> tuple[int, int]:
        """Half-open index range [lo, hi) of the rows of ``department`` received in [from, to]."""
        dep = departments.normalize(department)
        lo_day = 0 if date_from is None else _day_offset(date_from)
        hi_day = SPAN_DAYS - 1 if date_to is None else _day_offset(date_to)
        return self.index_range_days(dep, lo_day, hi_day)

    def index_range_days(self, dep: str, lo_day: int, hi_day: int) -> tuple[int, int]:
        """Like index_range with day offsets from START_DATE (inclusive both ends; may be out of span)."""
        n = self.counts[dep]
        if n == 0 or hi_day < lo_day:
            return (0, 0)
        # day(i) = i * SPAN_DAYS // n is non-decreasing; day(i) >= D  <=>  i >= ceil(D * n / SPAN_DAYS)
        lo = 0 if lo_day <= 0 else min(n, -(-lo_day * n // SPAN_DAYS))
        hi = n if hi_day >= SPAN_DAYS - 1 else max(0, min(n, -(-(hi_day + 1) * n // SPAN_DAYS)))
        return (lo, max(lo, hi))

    def day_of(self, department: str, i: int) -> int:
        """Day offset (from START_DATE) of the reception date of row i (also for malformed rows)."""
        n = self.counts[department]
        return i * SPAN_DAYS // n if i < n else self._born[(department, i)]

    def line_number(self, department: str, i: int) -> int:
        """The current ``_i`` of row i of ``department`` (larger once the row was updated)."""
        seq = self._loc.get((department, i))
        if seq is not None:
            return self._base_i + self._tail_offset + seq
        return self._base_i + i * N_DEPARTMENTS + DEPARTMENT_POSITION[department]

    # ---------------------------------------------------------------- the live dataset
    # The rows generated from (seed, department, index) are the "base".  Live changes are kept apart:
    # an updated or inserted row moves to the "tail" (a larger _i, as data-fair derives _i from the
    # time of indexing), a deactivated row leaves the view.  Base positions no longer served are
    # "holes".  Everything under one lock; a page is computed under it (consistent).
    def _init_live(self, virtual: bool) -> None:
        self.lock = threading.RLock()
        self.virtual = bool(virtual)
        self._base_i = VIRTUAL_I0 if self.virtual else 0
        self._tail_offset = N_DEPARTMENTS * (max(self.counts.values(), default=0) + 1)
        self.n_current = dict(self.counts)  # index count per department (inserts extend it)
        self._holes: dict[str, list[int]] = {}  # sorted base indices not served at their base place
        self._hole_set: set[tuple[str, int]] = set()
        self._tail: list[tuple[str, int]] = []  # (dep, i) per tail sequence number
        self._loc: dict[tuple[str, int], int] = {}  # (dep, i) -> its live tail sequence number
        self._version: dict[tuple[str, int], int] = {}
        self._mod_day: dict[tuple[str, int], int] = {}
        self._born: dict[tuple[str, int], int] = {}  # reception day of inserted rows
        self.gone: set[tuple[str, int]] = set()  # deactivated rows
        self.today = SPAN_DAYS  # day offset of the next live change: 2026-01-01, then advance_days()
        self.generation = 0
        stamp = _iso_now()
        self.created_at = self.updated_at = self.finalized_at = stamp
        self.changes = {"updated": 0, "inserted": 0, "deactivated": 0}

    @property
    def tail_start(self) -> int:
        """The _i of the first tail position (every base row's _i is below it)."""
        return self._base_i + self._tail_offset

    def _touch(self) -> None:
        self.updated_at = self.finalized_at = _iso_now()

    def _hole(self, dep: str, i: int) -> None:
        if i < self.counts[dep] and (dep, i) not in self._hole_set:
            self._hole_set.add((dep, i))
            bisect.insort(self._holes.setdefault(dep, []), i)

    def _to_tail(self, dep: str, i: int) -> None:
        self._hole(dep, i)
        self._loc[(dep, i)] = len(self._tail)
        self._tail.append((dep, i))
        self._mod_day[(dep, i)] = self.today

    def is_live(self, dep: str, i: int) -> bool:
        return 0 <= i < self.n_current[dep] and (dep, i) not in self.gone

    def update(self, department: str, i: int) -> None:
        """Row i gets new field values, today's date_derniere_modification_dpe and a larger _i."""
        dep = departments.normalize(department)
        with self.lock:
            if not self.is_live(dep, i):
                raise KeyError(f"row {dep}/{i} is not in the dataset")
            self._version[(dep, i)] = self._version.get((dep, i), 0) + 1
            self._to_tail(dep, i)
            self.changes["updated"] += 1
            self._touch()

    def insert(self, department: str, k: int = 1) -> list[int]:
        """k new rows at the end (received today); returns their indices."""
        dep = departments.normalize(department)
        with self.lock:
            out = []
            for _ in range(int(k)):
                i = self.n_current[dep]
                self.n_current[dep] = i + 1
                self._born[(dep, i)] = self.today
                self._to_tail(dep, i)
                out.append(i)
            self.changes["inserted"] += len(out)
            self._touch()
            return out

    def deactivate(self, department: str, i: int) -> None:
        """Row i leaves the view (a deactivated certificate)."""
        dep = departments.normalize(department)
        with self.lock:
            if not self.is_live(dep, i):
                raise KeyError(f"row {dep}/{i} is not in the dataset")
            self.gone.add((dep, i))
            self._hole(dep, i)
            self._loc.pop((dep, i), None)
            self.changes["deactivated"] += 1
            self._touch()

    def advance_days(self, days: int = 1) -> None:
        """Later changes are dated ``days`` later (date_derniere_modification_dpe)."""
        with self.lock:
            self.today += int(days)

    def recreate(self) -> None:
        """The dataset is re-created: same rows, a new createdAt, and _i restarting from small values."""
        with self.lock:
            self.generation += 1
            self._base_i = self.generation  # small, and different from any earlier generation
            self.created_at = _iso_now()
            self._touch()

    def live_indices(self, department: str) -> list[int]:
        """Indices of the rows of ``department`` in the view now, in _i order."""
        dep = departments.normalize(department)
        with self.lock:
            base = [i for i in range(self.counts[dep]) if (dep, i) not in self._hole_set]
            tail = [i for seq, (d, i) in enumerate(self._tail) if d == dep and self._loc.get((d, i)) == seq]
            return base + tail

    def current_rows(self, department: str) -> dict[str, dict]:
        """numero_dpe -> the row as the API serves it now (every field), for reconciliation tests."""
        dep = departments.normalize(department)
        with self.lock:
            out = {}
            for i in self.live_indices(dep):
                row = self.row(dep, i)
                out[row.get("numero_dpe", f"<missing {dep}/{i}>")] = row
            return out

    # ---------------------------------------------------------------- malformed rows
    def _hash(self, dep: str, i: int) -> int:
        return _mix(self._dep_seed[dep] ^ (i * 0x9E3779B97F4A7C15 & M64))

    def malformed_kind(self, department: str, i: int) -> str | None:
        """None for a healthy row, else "missing_numero_dpe" or "bad_date"."""
        if self._malformed_threshold == 0:
            return None
        h2 = _mix(self._hash(department, i) ^ 0x5DEECE66D)
        if (h2 >> 11) >= self._malformed_threshold:
            return None
        return MALFORMED_KINDS[h2 & 1]

    def is_malformed(self, department: str, i: int) -> bool:
        return self.malformed_kind(department, i) is not None

    def malformed_indices(self, department: str, date_from=None, date_to=None) -> list[tuple[int, str]]:
        """[(index, kind)] of the malformed rows of a department (scans the range: for tests)."""
        dep = departments.normalize(department)
        if self._malformed_threshold == 0:
            return []
        lo, hi = self.index_range(dep, date_from, date_to)
        out = []
        for i in range(lo, hi):
            kind = self.malformed_kind(dep, i)
            if kind:
                out.append((i, kind))
        return out

    def expected_malformed(self, department: str, date_from=None, date_to=None) -> int:
        return len(self.malformed_indices(department, date_from, date_to))

    # ---------------------------------------------------------------- rows
    def row(self, department: str, i: int, with_id: bool = True) -> dict:
        """Row ``i`` (0-based) of ``department`` as the API returns it without ``select`` (all fields)."""
        dep = departments.normalize(department)
        n = self.counts[dep]
        if not 0 <= i < self.n_current[dep]:
            raise IndexError(f"row {i} out of range for department {dep} ({self.n_current[dep]} rows)")
        return self._row(dep, i, n, with_id)

    def rows(self, department: str, indices, with_id: bool = True) -> list[dict]:
        """Rows at the given indices (no range check: the caller computed them)."""
        n = self.counts[department]
        make = self._row
        out = [make(department, i, n, with_id) for i in indices]
        return out

    def iter_rows(self, department: str, date_from=None, date_to=None, start: int = 0) -> Iterator[dict]:
        """The rows of a department received in [date_from, date_to], in index order (lazily)."""
        dep = departments.normalize(department)
        lo, hi = self.index_range(dep, date_from, date_to)
        n = self.counts[dep]
        for i in range(max(lo, start), hi):
            yield self._row(dep, i, n, True)

    def _row(self, dep: str, i: int, n: int, with_id: bool) -> dict:
        self.generated_rows += 1
        h = _mix(self._dep_seed[dep] ^ (i * 0x9E3779B97F4A7C15 & M64))
        g = _mix(h)
        day = i * SPAN_DAYS // n if i < n else self._born[(dep, i)]
        est_day = day - (h & 7)
        if est_day < 0:
            est_day = 0
        reception = _DAY_STR[day]
        etiquette = _ETIQ_TABLE[(h >> 3) % 10000]
        lo, hi = _CONSO_BANDS[etiquette]
        conso = lo + (h >> 17) % (hi - lo + 1)
        ges_idx = _GES_LABELS.index(etiquette) + ((h >> 27) % 5) - 2
        ges = _GES_LABELS[0 if ges_idx < 0 else (6 if ges_idx > 6 else ges_idx)]
        period, y0, y1 = _PERIODS[(g >> 5) % 9]
        cp, insee, commune = self._communes[dep][(g >> 9) % 40]
        # a bijection of [0, 10**7): affine map, digit reversal, affine map (no visible progression)
        # (shifted by a per-department offset, so departments do not share their digit sequences)
        d7 = (int(f"{((i + self._num_offset[dep]) * _NUM_MULT + _NUM_ADD) % 10_000_000:07d}"[::-1])
              * 7_654_321 + 2_718_281) % 10_000_000
        hi_part = i // 10_000_000
        if dep == departments.NONE:
            code2 = "00"
            letter = _LETTERS[hi_part % 26]
        elif len(dep) == 3:
            code2 = dep[:2]  # 97 overseas, 98 Nouvelle-Calédonie
            letter = _LETTERS[(hi_part * 8 + int(dep[2]) - 1) % 26]
        else:
            code2 = dep
            letter = _LETTERS[hi_part % 26]
        numero = f"{reception[2:4]}{code2}E{d7:07d}{letter}"
        kind_type = _TYPES[(g >> 15) % 8]
        surface = round(18 + ((g >> 18) % 17000) / 100.0 * (1.6 if kind_type == "maison" else 0.8), 1)
        if kind_type == "immeuble":
            surface = round(surface * 12, 1)
        version = self._version.get((dep, i), 0) if self._version else 0
        if version:  # an updated certificate: a new label and consumption (same dwelling, same number)
            v = _mix(h ^ (version * 0xD6E8FEB86659FD93 & M64))
            etiquette = _ETIQ_TABLE[(v >> 3) % 10000]
            lo, hi = _CONSO_BANDS[etiquette]
            conso = lo + (v >> 17) % (hi - lo + 1)
        mod = self._mod_day.get((dep, i)) if self._mod_day else None
        row = {
            "numero_dpe": numero,
            "date_etablissement_dpe": _DAY_STR[est_day],
            "date_reception_dpe": reception,
            "date_derniere_modification_dpe": reception if mod is None else _DAY_STR[mod],
            "etiquette_dpe": etiquette,
            "etiquette_ges": ges,
            "conso_5_usages_par_m2_ep": conso,
            "emission_ges_5_usages_par_m2": round(conso * (0.04 + ((g >> 35) % 25) / 100.0), 1),
            "type_batiment": kind_type,
            "periode_construction": period,
        }
        if (g >> 40) % 10 < 6:  # annee_construction is often missing in the real data
            row["annee_construction"] = y0 + (g >> 44) % (y1 - y0 + 1)
        row["surface_habitable_logement"] = surface
        row["type_energie_principale_chauffage"] = _ENERGIES[(g >> 50) % 8]
        if cp:  # a row without a department has no BAN address (absent keys, as in ES _source)
            row["code_postal_ban"] = cp
            row["code_insee_ban"] = insee
            row["nom_commune_ban"] = commune
            row["code_departement_ban"] = dep
        seq = self._loc.get((dep, i)) if self._loc else None
        row["_i"] = (self._base_i + i * N_DEPARTMENTS + DEPARTMENT_POSITION[dep] if seq is None
                     else self._base_i + self._tail_offset + seq)
        row["_rand"] = (g >> 20) % 1_000_000
        if with_id:
            x, chars = h ^ g, []
            for _ in range(11):
                chars.append(_B62[x % 62])
                x //= 62
            row["_id"] = "".join(chars) + _B62[i % 62]
        if self._malformed_threshold:
            kind = self.malformed_kind(dep, i)
            if kind == "missing_numero_dpe":
                del row["numero_dpe"]
            elif kind == "bad_date":
                row["date_reception_dpe"] = "not-a-date"
        return row

    # ---------------------------------------------------------------- metadata
    def metadata(self, public_url: str) -> dict:
        """The dataset document of GET /data-fair/api/v1/datasets/dpe03existant (subset)."""
        return {
            "id": self.dataset_id,
            "slug": self.dataset_id,
            "title": "DPE Logements existants (depuis juillet 2021)",
            "description": "Stand-in locale (données synthétiques déterministes) du jeu de données ADEME dpe03existant.",
            "href": f"{public_url}/api/v1/datasets/{self.dataset_id}",
            "page": f"{public_url}/datasets/{self.dataset_id}",
            "status": "finalized",
            "isRest": False,
            "isVirtual": self.virtual,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "finalizedAt": self.finalized_at,
            "count": self.live_total,
            "schema": [dict(f) for f in SCHEMA],
            "license": {"title": "Licence Ouverte / Open Licence", "href": "https://www.etalab.gouv.fr/licence-ouverte-open-licence"},
            "origin": "https://data.ademe.fr/datasets/dpe03existant",
            "x-standin": {"seed": self.seed, "malformed_rate": self.malformed_rate},
        }


def _iso_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _day_offset(value) -> int:
    if isinstance(value, _dt.datetime):
        value = value.date()
    if isinstance(value, str):
        value = _dt.date.fromisoformat(value)
    if not isinstance(value, _dt.date):
        raise TypeError(f"not a date: {value!r}")
    return value.toordinal() - _ORDINAL0


class LiveChanges:
    """Changes applied to a Dataset while clients page it, by request count (deterministic).

    Every ``every`` requests to ``/lines`` (counted by the server), in each of ``departments``: update
    ``updates`` rows (new values, a larger _i: served again later in the same pass), insert ``inserts``
    rows at the end, deactivate ``deactivations`` rows (they vanish from the view).  Rows are drawn from
    a hash of (seed, request number).  ``stop_after`` rounds, then nothing changes any more (0 = never
    stops).  ``rounds`` counts what was applied.
    """

    def __init__(self, departments_: list[str], every: int = 3, updates: int = 0, inserts: int = 0,
                 deactivations: int = 0, seed: int = 0, stop_after: int = 0):
        self.departments = [departments.normalize(d) for d in departments_]
        self.every, self.updates, self.inserts, self.deactivations = int(every), updates, inserts, deactivations
        self.seed, self.stop_after = seed, stop_after
        self.rounds = 0
        self.enabled = True
        self._lock = threading.Lock()
        self._seen = 0

    def on_request(self, ds: "Dataset") -> None:
        with self._lock:
            self._seen += 1
            if not self.enabled or self._seen % self.every or (self.stop_after and self.rounds >= self.stop_after):
                return
            self.rounds += 1
            number = self._seen
        for dep in self.departments:
            with ds.lock:
                h = _mix((self.seed << 32) ^ number ^ hash_str(dep))
                for k in range(self.updates + self.deactivations):
                    live = ds.n_current[dep]
                    if live == 0:
                        break
                    for attempt in range(20):
                        h = _mix(h + k + attempt)
                        i = h % live
                        if ds.is_live(dep, i):
                            break
                    else:
                        continue
                    if k < self.updates:
                        ds.update(dep, i)
                    else:
                        ds.deactivate(dep, i)
                if self.inserts:
                    ds.insert(dep, self.inserts)
