"""French department codes: validation and normalisation.

Valid forms: 01..19, 2A, 2B, 21..95 (metropolitan France, Corsica as 2A/2B) and 971..976 (overseas).
"""

from __future__ import annotations

VALID_FORMS = "01..19, 2A, 2B, 21..95, 971..976"

METROPOLITAN = [f"{n:02d}" for n in range(1, 20)] + ["2A", "2B"] + [f"{n:02d}" for n in range(21, 96)]
OVERSEAS = [str(n) for n in range(971, 977)]
ALL_DEPARTMENTS: tuple[str, ...] = tuple(METROPOLITAN + OVERSEAS)
_VALID = frozenset(ALL_DEPARTMENTS)


class InvalidDepartment(ValueError):
    """A department code that is not one of the valid forms."""

    def __init__(self, raw: object):
        self.raw = raw
        super().__init__(f"invalid department code {raw!r}: valid forms are {VALID_FORMS}")


def normalize(raw: object) -> str:
    """Return the canonical code for ``raw`` (``69``, ``"1"`` -> ``"01"``, ``"2a"`` -> ``"2A"``).

    Raises InvalidDepartment for anything else (``20``, ``99``, ``977``, ``abc``, empty).
    """
    if isinstance(raw, bool):
        raise InvalidDepartment(raw)
    if isinstance(raw, int):
        text = str(raw)
    elif isinstance(raw, float) and raw.is_integer():
        text = str(int(raw))
    elif isinstance(raw, str):
        text = raw.strip().upper()
    else:
        raise InvalidDepartment(raw)
    if text.isdigit() and len(text) == 1:
        text = "0" + text
    if text not in _VALID:
        raise InvalidDepartment(raw)
    return text


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
    """The DNS-safe lower-case form used in Kubernetes object names (``2A`` -> ``2a``)."""
    return normalize(code).lower()
