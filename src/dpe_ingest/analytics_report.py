"""The analytics report: what ``dpe-ingest analytics --report`` and ``--json`` print (pure: built from
the counts :meth:`dpe_ingest.analytics.Store.read` reads in one snapshot, rendered as text or JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import departments as deps

LABELS = ("A", "B", "C", "D", "E", "F", "G")
UNKNOWN = "unknown"


@dataclass
class Report:
    """Per department: certificates per label and per reception month, the latest reception date; the
    messages skipped by reason and the stored offsets."""

    labels: dict[str, dict[str, int]] = field(default_factory=dict)  # department -> label -> n
    months: dict[str, dict[str, int]] = field(default_factory=dict)  # department -> YYYY-MM|unknown -> n
    latest: dict[str, str | None] = field(default_factory=dict)  # department -> latest date_reception_dpe
    skipped: dict[str, int] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)

    def departments(self) -> list[str]:
        found = set(self.labels)
        order = [d for d in deps.ALL_DEPARTMENTS if d in found]
        return order + sorted(found - set(order))

    def rows(self, dep: str) -> int:
        return sum(self.labels.get(dep, {}).values())

    def fg_share(self, dep: str) -> float | None:
        total = self.rows(dep)
        by = self.labels.get(dep, {})
        return (by.get("F", 0) + by.get("G", 0)) / total if total else None

    def last_months(self, dep: str, n: int = 12) -> list[tuple[str, int]]:
        """The ``n`` months up to the department's latest reception month, zeros included."""
        by = self.months.get(dep, {})
        known = sorted(m for m in by if m != UNKNOWN)
        if not known:
            return []
        y, m = map(int, known[-1].split("-"))
        out = []
        for _ in range(n):
            key = f"{y:04d}-{m:02d}"
            out.append((key, by.get(key, 0)))
            y, m = (y, m - 1) if m > 1 else (y - 1, 12)
        return out[::-1]

    def to_json(self) -> dict:
        deps = {}
        for d in self.departments():
            by = self.labels.get(d, {})
            share = self.fg_share(d)
            deps[d] = {"rows": self.rows(d), "labels": {k: by.get(k, 0) for k in (*LABELS, UNKNOWN)},
                       "fg": by.get("F", 0) + by.get("G", 0),
                       "fg_share": None if share is None else round(share, 6),
                       "latest_reception": self.latest.get(d),
                       "months": dict(sorted(self.months.get(d, {}).items()))}
        return {"version": 1, "departments": deps, "skipped": dict(sorted(self.skipped.items())),
                "offsets": self.offsets}

    def render(self, bar_width: int = 40) -> str:
        out = []
        deps = self.departments()
        if not deps:
            out.append("analytics: nothing counted yet")
        for d in deps:
            total, by, share = self.rows(d), self.labels.get(d, {}), self.fg_share(d)
            out.append(f"department {d}: {total} certificates, F+G {100 * (share or 0):.1f}% "
                       f"({by.get('F', 0) + by.get('G', 0)}), latest reception {self.latest.get(d) or '-'}")
            w = max([len(str(by.get(k, 0))) for k in (*LABELS, UNKNOWN)] + [1])
            for k in (*LABELS, UNKNOWN):
                n = by.get(k, 0)
                if k == UNKNOWN and not n:
                    continue
                pct = 100.0 * n / total if total else 0.0
                out.append(f"  {k:<7} {n:>{w}}  {pct:5.1f}%  " + "#" * int(round(pct / 2)))
            months = self.last_months(d)
            if months:
                top = max(n for _, n in months) or 1
                wm = max(len(str(n)) for _, n in months)
                out.append("  rows per month (last 12 months):")
                for key, n in months:
                    out.append(f"    {key}  {n:>{wm}}  " + "#" * int(round(n * bar_width / top)))
            unknown = self.months.get(d, {}).get(UNKNOWN, 0)
            if unknown:
                out.append(f"    no reception date: {unknown}")
            out.append("")
        if any(self.skipped.values()):
            out.append("skipped messages: " + ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items()) if n))
        return "\n".join(out).rstrip("\n") + "\n"
