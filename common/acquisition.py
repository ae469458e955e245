"""Acquisition attributes of a patient's stack, read from the DICOM headers of the series it was built from.

These say *how* a patient was scanned (scanner vendor, field strength, fat-suppressed T2, slice thickness, in-plane
spacing, lossy archiving), never *who*: levels are coarse bins, so a level identifies a scanner park, not a patient.
They are written to index.csv (one `acq-<name>` column each), shown on the QC page, counted in the census (with the
site's minimum cell count) and used to stratify the evaluation (server/stratified.py).

Levels are short fixed strings; UNKNOWN where the header does not say.
"""

from __future__ import annotations

import re

UNKNOWN = "unknown"

# name → what the report calls it. Order is the report's order.
ATTRIBUTES: dict[str, str] = {
    "manufacturer": "Scanner manufacturer",
    "field-strength": "Field strength",
    "t2-fat-suppression": "Fat-suppressed T2",
    "slice-thickness": "Slice thickness",
    "pixel-spacing": "In-plane pixel spacing",
    "lossy-compression": "Lossy compression",
}


def column(name: str) -> str:
    """The index.csv column of attribute `name`."""
    return f"acq-{name}"


COLUMNS = tuple(column(name) for name in ATTRIBUTES)


# ---- levels from the headers --------------------------------------------------------------------------------------
# Bins are coarse on purpose: a level names a kind of scanner park, and each level must gather enough patients across
# the federation to estimate anything. Boundaries are inclusive on the lower bin's side (4.5 mm is "3.5-4.5 mm").

YES, NO = "yes", "no"
# Stored with each stack's levels (stacks/<key>.json): a change of a bin or of how a header is read bumps it, and the
# next prepare rebuilds the patients whose levels were read under another version.
LEVELS_VERSION = "acq-v1"
# first match wins; matched against the Manufacturer tag as vendors write it ("SIEMENS", "GE MEDICAL SYSTEMS",
# "Philips Medical Systems", "TOSHIBA_MEC", "CANON_MEC", "Hitachi Medical Corporation", "FUJIFILM Healthcare")
VENDORS = (
    (re.compile(r"siemens", re.I), "Siemens"),
    (re.compile(r"\bge\b|general electric|^gems", re.I), "GE"),
    (re.compile(r"philips", re.I), "Philips"),
    (re.compile(r"canon|toshiba", re.I), "Canon/Toshiba"),
    (re.compile(r"hitachi|fujifilm", re.I), "Hitachi/Fujifilm"),
)
FIELD_STRENGTHS = ((1.4, 1.6, "1.5 T"), (2.8, 3.2, "3 T"))  # tesla ranges; anything else (0.3, 1.0, 7 T) is "other"
# (low, high, levels): below low, low..high inclusive, above high. Sagittal spine slices are 3-4 mm; in-plane spacing
# is the coarser of the two series' (the one that limits the detail the model sees), 0.3-0.9 mm in DESIGN.md's range
SLICE_THICKNESS = (3.5, 4.5, ("<3.5 mm", "3.5-4.5 mm", ">4.5 mm"))
PIXEL_SPACING = (0.6, 0.9, ("<0.6 mm", "0.6-0.9 mm", ">0.9 mm"))


# Every level attributes_of gives, per attribute (UNKNOWN aside)
LEVELS: dict[str, tuple[str, ...]] = {
    "manufacturer": (*(level for _, level in VENDORS), "other"),
    "field-strength": (*(level for _, _, level in FIELD_STRENGTHS), "other"),
    "t2-fat-suppression": (YES, NO),
    "slice-thickness": SLICE_THICKNESS[2],
    "pixel-spacing": PIXEL_SPACING[2],
    "lossy-compression": (YES, NO),
}


def manufacturer_level(text: str) -> str:
    text = (text or "").strip()
    if not text:
        return UNKNOWN
    return next((level for pattern, level in VENDORS if pattern.search(text)), "other")


def field_strength_level(tesla: float | None) -> str:
    if tesla is None or not tesla > 0:
        return UNKNOWN
    if tesla > 100:  # written in gauss by some older scanners (15000 G = 1.5 T)
        tesla /= 10000
    return next((level for lo, hi, level in FIELD_STRENGTHS if lo <= tesla <= hi), "other")


def binned(value: float | None, bins: tuple) -> str:
    """The level of a length in mm under SLICE_THICKNESS or PIXEL_SPACING; UNKNOWN for no (or no positive) value."""
    if value is None or not value > 0:
        return UNKNOWN
    low, high, (below, within, above) = bins
    value = round(value, 3)  # 4.5000001 from a DS string is 4.5
    return below if value < low else within if value <= high else above


def _coarsest(values) -> float | None:
    known = [v for v in values if v is not None and v > 0]
    return max(known) if known else None


def attributes_of(t1, t2) -> dict[str, str]:
    """Acquisition levels of a stack built from the T1W and T2W series `t1`, `t2` (common.dicom.Series).

    Vendor and field strength from the T1W series (the T2W one where T1W's header is silent); T2 fat suppression
    as series selection reads it (common.series.fat_saturated: ScanOptions, SpectrallySelectedSuppression, SPAIR/
    SPIR/fat sat in the description); slice thickness and in-plane pixel spacing are the coarser of the two series
    (the one that limits the detail the model sees); lossy when either series holds a lossy-compressed file."""
    from common.series import fat_saturated  # lazy: common.series imports common.dicom, which is heavy

    spacing = _coarsest([max(f.plane.spacing) for s in (t1, t2) for f in s.frames[:1]])
    return {
        "manufacturer": manufacturer_level(t1.manufacturer or t2.manufacturer),
        "field-strength": field_strength_level(t1.field_strength or t2.field_strength),
        "t2-fat-suppression": YES if fat_saturated(t2) else NO,
        "slice-thickness": binned(_coarsest((t1.slice_thickness, t2.slice_thickness)), SLICE_THICKNESS),
        "pixel-spacing": binned(spacing, PIXEL_SPACING),
        "lossy-compression": YES if t1.lossy or t2.lossy else NO,
    }


# What a level may look like on the wire (tag reports' strata, census keys): a short bin name, never free text.
_LEVEL = re.compile(r"[A-Za-z0-9<>][A-Za-z0-9 .<>/_+-]{0,31}")


def is_level(text) -> bool:
    """Whether `text` has the shape of a level (a short bin name such as "3 T" or "<3.5 mm"), checked at the site
    before a stratum leaves and at the coordinator before one is used."""
    return isinstance(text, str) and _LEVEL.fullmatch(text) is not None


# ---- the census: each site's mix, counts per level -----------------------------------------------------------------
# Keys `acq/<name>/<level>` (split on the first two "/": a level may hold one, as "Canon/Toshiba"), one per level
# present at the site, value the number of usable patients; SUPPRESSED where the count is under the site's minimum
# cell count. `acq-min-cell` says which floor was applied (so the coordinator can print "<5").
CENSUS_PREFIX = "acq/"
CENSUS_MIN_CELL = "acq-min-cell"
SUPPRESSED = -1


def census_key(name: str, level: str) -> str:
    return f"{CENSUS_PREFIX}{name}/{level}"


def hidden_levels(counts: dict[str, int], min_cell: int, total_known: bool = True) -> set[str]:
    """The levels whose counts must not leave: primary suppression (a count in (0, min_cell)), then, when the total
    is known (the census sends it), complementary suppression: while the hidden levels hold together fewer than
    min_cell patients (one hidden level: its count would be the total minus the others), the smallest other level
    is hidden too (ties by level name). A lone level cannot be hidden this way: its count is the total."""
    hidden = {level for level, n in counts.items() if 0 < n < min_cell}
    while total_known and 0 < sum(counts[lv] for lv in hidden) < min_cell:
        others = sorted((n, level) for level, n in counts.items() if n > 0 and level not in hidden)
        if not others:
            break
        hidden.add(others[0][1])
    return hidden


def suppress(counts: dict[str, int], min_cell: int, total_known: bool = True) -> dict[str, int]:
    """Counts per level with the hidden_levels sent as SUPPRESSED."""
    hidden = hidden_levels(counts, min_cell, total_known)
    return {level: SUPPRESSED if level in hidden else int(n) for level, n in counts.items()}


def census_counts(attributes: dict[str, tuple[str, ...]], min_cell: int) -> dict[str, int]:
    """A site's acquisition mix for the census (numbers only, a Flower MetricRecord's values): `acq/<name>/<level>`
    → count per level present, small cells suppressed (`suppress`), and CENSUS_MIN_CELL."""
    out: dict[str, int] = {CENSUS_MIN_CELL: int(min_cell)}
    for name in ATTRIBUTES:
        # a hand-edited index.csv could hold anything: only a level's shape leaves the site
        levels = [v if is_level(v) else "other" for v in attributes.get(name, ())]
        counts = {level: levels.count(level) for level in sorted(set(levels))}
        out.update({census_key(name, level): n for level, n in suppress(counts, min_cell).items()})
    return out


def mix_of(census: dict) -> dict[str, dict[str, int]]:
    """A census reply's counts back as attribute → level → count (SUPPRESSED kept), attributes in ATTRIBUTES order;
    unknown attribute names are kept after them (a newer site), never dropped."""
    mix: dict[str, dict[str, int]] = {}
    for key, value in census.items():
        if not str(key).startswith(CENSUS_PREFIX):
            continue
        name, _, level = str(key)[len(CENSUS_PREFIX) :].partition("/")
        mix.setdefault(name, {})[level] = int(value)
    order = list(ATTRIBUTES) + sorted(set(mix) - set(ATTRIBUTES))
    return {name: dict(sorted(mix[name].items(), key=lambda kv: (-kv[1], kv[0]))) for name in order if name in mix}


# Short names for one terminal line per site (the level says the rest: "3 T", "Siemens")
SHORT = {
    "t2-fat-suppression": "fat-sat T2",
    "slice-thickness": "slice",
    "pixel-spacing": "pixel",
    "lossy-compression": "lossy",
}


def describe_mix(census: dict) -> str:
    """A site's mix on one line: 'Siemens 20, GE <5 | 1.5 T 22 | fat-sat T2: no 22 | slice: 3.5-4.5 mm 22 | ...'
    ('' when the reply carries none: a site on an older release)."""
    floor = int(census.get(CENSUS_MIN_CELL, 0) or 0)
    hidden = f"<{floor}" if floor > 1 else "suppressed"
    parts = []
    for name, levels in mix_of(census).items():
        prefix = f"{SHORT[name]}: " if name in SHORT else "" if name in ATTRIBUTES else f"{name}: "
        parts.append(prefix + ", ".join(f"{level} {hidden if n == SUPPRESSED else n}" for level, n in levels.items()))
    return " | ".join(parts)
