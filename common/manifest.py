"""The site's manifest.csv (DESIGN.md site data contract): one row per patient, checked row by row.

A manifest that cannot be used at all raises ManifestError. A bad row becomes a `ManifestRow` with `problem` set,
naming its line (the header is line 1), so that patient is skipped while the others go on.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from common.errors import ManifestError
from common.sitedata import UNLABELLED, parse_label

REQUIRED = ("patient_id", "x0", "y0", "x1", "y1")
LESION = ("lesion_sop_uid", "lesion_instance")
OPTIONAL = ("label", "study_uid", "t1_series_uid", "t2_series_uid", "level", "qc")
QC_ACCEPT = ("", "ok", "accept", "accepted", "pass")  # `qc` values that keep the patient (empty: not reviewed yet)


@dataclass(frozen=True)
class ManifestRow:
    line: int
    patient_id: str
    label: int  # 0 benign, 1 malignant, -1 unlabelled
    lesion_sop_uid: str = ""
    lesion_instance: int | None = None
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    study_uid: str = ""
    t1_series_uid: str = ""
    t2_series_uid: str = ""
    level: str = ""
    qc: str = ""  # the radiologist's verdict from the QC page (accepted values only; a reject is a `problem`)
    problem: str = ""  # non-empty: the row cannot be used, and why

    @property
    def qc_excluded(self) -> bool:
        """Left out by the radiologist's `qc` verdict (a reject, or a verdict not understood)."""
        return bool(self.qc) and bool(self.problem) and self.problem == qc_problem(self.qc, self.line)

    def fields(self) -> tuple:
        """Everything that decides this patient's cached outputs (the incremental cache's fingerprint): the stack,
        and the level printed on its QC montage."""
        return (
            self.patient_id,
            self.label,
            self.lesion_sop_uid,
            self.lesion_instance,
            self.box,
            self.study_uid,
            self.t1_series_uid,
            self.t2_series_uid,
            self.level,
        )


def _int(text: str) -> int | None:
    try:
        value = float(text.strip())
    except (ValueError, AttributeError):
        return None
    return int(value) if value.is_integer() else None


def read_manifest(path: Path) -> list[ManifestRow]:
    """Parse and check manifest.csv (UTF-8, BOM tolerated)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found (the site root must hold manifest.csv)") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text (byte {exc.start}); save the manifest as UTF-8 CSV") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        sample = text[:4096]
        dialect = csv.Sniffer().sniff(sample, delimiters=",;\t") if sample.strip() else csv.excel
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(text.splitlines(), dialect)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise ManifestError(f"{path}: empty file; expected a header row with {', '.join(REQUIRED)}") from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ManifestError(f"{path}: required column(s) missing: {', '.join(missing)} (header is line 1)")
    if not any(c in header for c in LESION):
        raise ManifestError(f"{path}: needs a lesion_sop_uid or lesion_instance column (header is line 1)")
    dupes = sorted({h for h in header if h and header.count(h) > 1})
    if dupes:
        raise ManifestError(f"{path}: column(s) named twice in the header: {', '.join(dupes)}")

    rows: list[ManifestRow] = []
    try:
        for line, values in enumerate(reader, start=2):
            if not any(v.strip() for v in values):
                continue
            rows.append(_row(line, header, values))
    except csv.Error as exc:
        raise ManifestError(f"{path}: line {reader.line_num}: not valid CSV ({exc})") from None
    return _mark_duplicates(rows)


def _row(line: int, header: list[str], values: list[str]) -> ManifestRow:
    rec = {h: (values[i].strip() if i < len(values) else "") for i, h in enumerate(header)}
    pid = rec.get("patient_id", "")
    base = {"line": line, "patient_id": pid, "label": UNLABELLED}
    if len(values) > len(header):
        return ManifestRow(
            **base, problem=f"manifest line {line}: {len(values)} fields but the header has {len(header)}"
        )
    if not pid:
        return ManifestRow(**base, problem=f"manifest line {line}: patient_id is empty")
    label = parse_label(rec.get("label", ""))
    if label is None:
        return ManifestRow(**base, problem=f"manifest line {line}: label {rec['label']!r} is not benign or malignant")
    base["label"] = label
    box = []
    for name in ("x0", "y0", "x1", "y1"):
        v = _int(rec.get(name, ""))
        if v is None:
            return ManifestRow(
                **base, problem=f"manifest line {line}: {name} {rec.get(name, '')!r} is not a whole number"
            )
        box.append(v)
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
        return ManifestRow(
            **base,
            problem=f"manifest line {line}: box ({x0},{y0})-({x1},{y1}) is empty or negative (needs 0 <= x0 < x1, 0 <= y0 < y1)",
        )
    sop = rec.get("lesion_sop_uid", "")
    inst_text = rec.get("lesion_instance", "")
    inst = _int(inst_text) if inst_text else None
    if inst_text and (inst is None or inst < 0):
        return ManifestRow(**base, problem=f"manifest line {line}: lesion_instance {inst_text!r} is not a whole number")
    if not sop and inst is None:
        return ManifestRow(**base, problem=f"manifest line {line}: neither lesion_sop_uid nor lesion_instance is given")
    qc = rec.get("qc", "")
    verdict = qc_problem(qc, line)
    if verdict:
        return ManifestRow(**base, level=rec.get("level", ""), qc=qc, problem=verdict)
    return ManifestRow(
        line=line,
        patient_id=pid,
        label=label,
        lesion_sop_uid=sop,
        lesion_instance=inst,
        box=(x0, y0, x1, y1),
        study_uid=rec.get("study_uid", ""),
        t1_series_uid=rec.get("t1_series_uid", ""),
        t2_series_uid=rec.get("t2_series_uid", ""),
        level=rec.get("level", ""),
        qc=qc,
    )


def qc_problem(value: str, line: int) -> str:
    """The skip reason a `qc` cell asks for ("" keeps the patient). `reject`, optionally followed by a reason
    ("reject: wrong level", "rejected - motion"), excludes the patient; so does a value that is neither a reject nor
    an accept, since a mistyped verdict should not let a rejected patient through."""
    text = " ".join(value.split())
    low = text.lower()
    if low in QC_ACCEPT:
        return ""
    if low.startswith("reject"):
        why = text[len("rejected") if low.startswith("rejected") else len("reject") :].strip(" :-–—,;.")
        return f"manifest line {line}: rejected at QC review" + (f" ({why})" if why else "")
    return (
        f"manifest line {line}: qc {value!r} is not understood (write reject, optionally with a reason as in "
        "'reject: wrong level', or ok, or leave it empty); the patient is left out until it is"
    )


def _mark_duplicates(rows: list[ManifestRow]) -> list[ManifestRow]:
    """A patient_id on several lines is ambiguous: every one of those rows is skipped, naming all the lines."""
    lines = defaultdict(list)
    for r in rows:
        if r.patient_id:
            lines[r.patient_id].append(r.line)
    out = []
    for r in rows:
        seen = lines.get(r.patient_id, [])
        if len(seen) > 1 and not r.problem:
            others = ", ".join(str(n) for n in seen)
            r = ManifestRow(
                line=r.line,
                patient_id=r.patient_id,
                label=r.label,
                problem=f"manifest line {r.line}: patient_id appears on several lines ({others}); keep one",
            )
        out.append(r)
    return out
