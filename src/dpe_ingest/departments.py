"""French department codes: validation and normalisation.

Valid forms: 01..19, 2A, 2B, 21..95 (metropolitan France, Corsica as 2A/2B), 971..978 and 988
(overseas: every code the ADEME dataset holds, Saint-Pierre-et-Miquelon 975, Saint-Barthélemy 977,
Saint-Martin 978, Nouvelle-Calédonie 988 included), and the pseudo-department ``none``: the rows of
the dataset without any ``code_departement_ban`` (about 3.4 % of dpe03existant), reachable only with
``qs=NOT _exists_:code_departement_ban``.  Every department plus ``none`` is the whole dataset.
"""

from __future__ import annotations

#: the pseudo-department of the rows with no code_departement_ban (stored with departement NULL)
NONE = "none"
VALID_FORMS = "01..19, 2A, 2B, 21..95, 971..978, 988, none (rows without a department)"

METROPOLITAN = [f"{n:02d}" for n in range(1, 20)] + ["2A", "2B"] + [f"{n:02d}" for n in range(21, 96)]
OVERSEAS = [str(n) for n in range(971, 979)] + ["988"]
#: every real department code of the dataset, in order
ALL_DEPARTMENTS: tuple[str, ...] = tuple(METROPOLITAN + OVERSEAS)
#: what a producer can be given: every department, then ``none``
ALL_CODES: tuple[str, ...] = ALL_DEPARTMENTS + (NONE,)
_VALID = frozenset(ALL_CODES)


class InvalidDepartment(ValueError):
    """A department code that is not one of the valid forms."""

    def __init__(self, raw: object):
        self.raw = raw
        super().__init__(f"invalid department code {_shown(raw)}: valid forms are {VALID_FORMS}")


def _shown(raw: object) -> str:
    """``repr(raw)``, short: an integer of 4300 digits or more has no repr (ValueError), a long text is cut."""
    if isinstance(raw, int) and not isinstance(raw, bool) and abs(raw) >= 10**20:
        return f"<an integer of about {int(abs(raw).bit_length() * 0.30103) + 1} digits>"
    text = repr(raw)
    return text if len(text) <= 80 else text[:80] + f"… ({len(text)} characters)"


def normalize(raw: object) -> str:
    """Return the canonical code for ``raw`` (``69``, ``"1"`` -> ``"01"``, ``"2a"`` -> ``"2A"``,
    ``"NONE"`` -> ``"none"``).

    Raises InvalidDepartment for anything else (``20``, ``99``, ``979``, ``2C``, ``6a``, empty).
    """
    if isinstance(raw, bool):
        raise InvalidDepartment(raw)
    if isinstance(raw, int):
        if not 0 <= raw < 1000:  # every code is below 1000 (str() of 4300 digits raises ValueError)
            raise InvalidDepartment(raw)
        text = str(raw)
    elif isinstance(raw, float) and raw.is_integer():
        if not 0 <= raw < 1000:
            raise InvalidDepartment(raw)
        text = str(int(raw))
    elif isinstance(raw, str):
        text = raw.strip().upper()
    else:
        raise InvalidDepartment(raw)
    if text == "NONE":
        return NONE
    if text.isdigit() and len(text) == 1:
        text = "0" + text
    if text not in _VALID:
        raise InvalidDepartment(raw)
    return text


def is_none(code: str) -> bool:
    """True for the pseudo-department of the rows without code_departement_ban."""
    return code == NONE


def stored_department(code: str) -> str | None:
    """The ``departement`` a row of producer ``code`` carries: the code, or None for ``none``."""
    return None if code == NONE else code


def parse_list(raw: str | list | tuple) -> list[str]:
    """Parse ``"69,01,38"`` / ``"69 01 38"`` / ``["69", 1]`` into distinct canonical codes, in order."""
    if isinstance(raw, str):
        items = [p for p in raw.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    else:
        items = list(raw)
    if not items:
        raise InvalidDepartment(raw)
    out: list[str] = []
    for item in items:
        code = normalize(item)
        if code not in out:
            out.append(code)
    return out


def dns_label(code: str) -> str:
    """The DNS-safe lower-case form used in Kubernetes object names (``2A`` -> ``2a``, ``none``)."""
    return normalize(code).lower()
