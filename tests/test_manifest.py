"""manifest.csv's optional `qc` column: the radiologist's verdict from the QC page (cache/qc/index.html)."""

from __future__ import annotations

import pytest

from common.manifest import read_manifest

HEADER = "patient_id,label,lesion_instance,x0,y0,x1,y1"


def rows_of(tmp_path, text: str):
    path = tmp_path / "manifest.csv"
    path.write_text(text, encoding="utf-8")
    return read_manifest(path)


def test_the_column_is_optional(tmp_path):
    (row,) = rows_of(tmp_path, f"{HEADER}\nP1,benign,5,1,1,9,9\n")
    assert row.problem == "" and row.qc == ""


@pytest.mark.parametrize(
    ("cell", "reason"),
    [
        ("reject", "manifest line 2: rejected at QC review"),
        ("Reject: wrong level", "manifest line 2: rejected at QC review (wrong level)"),
        ('"REJECTED - motion, repeat T2"', "manifest line 2: rejected at QC review (motion, repeat T2)"),
        ('"reject: box on L3, lesion is L4"', "manifest line 2: rejected at QC review (box on L3, lesion is L4)"),
    ],
)
def test_a_reject_skips_the_row_with_its_reason(tmp_path, cell, reason):
    (row,) = rows_of(tmp_path, f"{HEADER},level,qc\nP1,benign,5,1,1,9,9,L2,{cell}\n")
    assert row.problem == reason
    assert row.level == "L2"  # still shown on the QC page


@pytest.mark.parametrize("cell", ["", "ok", "OK", " accepted ", "pass"])
def test_an_accept_or_an_empty_cell_keeps_the_row(tmp_path, cell):
    (row,) = rows_of(tmp_path, f"{HEADER},qc\nP1,benign,5,1,1,9,9,{cell}\n")
    assert row.problem == "" and row.qc == cell.strip()


def test_a_verdict_that_is_not_understood_leaves_the_patient_out(tmp_path):
    """A mistyped reject must not let the patient through."""
    (row,) = rows_of(tmp_path, f"{HEADER},qc\nP1,benign,5,1,1,9,9,rejet\n")
    assert row.problem.startswith("manifest line 2: qc 'rejet' is not understood")
    assert "reject: wrong level" in row.problem


def test_the_level_is_part_of_the_fingerprint_the_verdict_is_not(tmp_path):
    """The level is printed on the QC picture (a change rebuilds it); an accept changes nothing cached."""
    a, b, c = rows_of(tmp_path, f"{HEADER},level,qc\nP1,benign,5,1,1,9,9,L2,\nP2,benign,5,1,1,9,9,L3,ok\n"
                      "P3,benign,5,1,1,9,9,L2,ok\n")  # fmt: skip
    assert a.fields()[1:] != b.fields()[1:]
    assert a.fields()[1:] == c.fields()[1:]
