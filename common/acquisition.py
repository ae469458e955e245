"""Acquisition attributes of a patient's stack, read from the DICOM headers of the series it was built from.

These say *how* a patient was scanned (scanner vendor, field strength, fat-suppressed T2, slice thickness, in-plane
spacing, lossy archiving), never *who*: levels are coarse bins, so a level identifies a scanner park, not a patient.
They are written to index.csv (one `acq-<name>` column each), shown on the QC page, counted in the census (with the
site's minimum cell count) and used to stratify the evaluation (server/stratified.py).

Levels are short fixed strings; UNKNOWN where the header does not say.
"""

from __future__ import annotations

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
