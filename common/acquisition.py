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


# What a level may look like on the wire (tag reports' strata, census keys): a short bin name, never free text.
_LEVEL = re.compile(r"[A-Za-z0-9<>][A-Za-z0-9 .<>/_+-]{0,31}")


def is_level(text) -> bool:
    """Whether `text` has the shape of a level (a short bin name such as "3 T" or "<3.5 mm"), checked at the site
    before a stratum leaves and at the coordinator before one is used."""
    return isinstance(text, str) and _LEVEL.fullmatch(text) is not None
