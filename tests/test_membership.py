"""Per-patient membership at a real site cache: one patient more or less moves no other patient in any unit.

This is the neighbouring-dataset assumption of DP-SGD (deploy/DATA_FLOW.md): the site's selection code
(client/tasks.select, the same the ClientApp runs) is exercised on prepared caches that differ by one row of
index.csv, inserted or removed anywhere, for every unit a protocol trains: tenfold folds, inner validation,
site-held-out, local-only and final.
"""

from __future__ import annotations

import csv
import random
import shutil

import pytest

from client.tasks import SiteRefusal, membership, open_site, select, sit_out_reason
from tests.tinysites import make_site

K, FOLD_SEED, SPLIT_SEED, VAL = 10, 4, 9, 0.2


def _units() -> list[tuple[str, int, int]]:
    """(name, k, held_out) of every unit kind: fold models (local-only uses fold 0), and all-patient models."""
    return [(f"tenfold fold {f}", K, f) for f in range(K)] + [("site-held-out / final", 0, -1)]


def _membership(site_yaml) -> dict[tuple[str, str], set[str]]:
    site = open_site({"site-config": str(site_yaml)}, {})
    keys = site.data.keys
    out = {}
    for name, k, held in _units():
        for subset in ("held-out", "inner-train", "validation"):
            if subset == "held-out" and held < 0:
                continue
            try:
                idx, _ = select(site, subset, k, FOLD_SEED, held, VAL, SPLIT_SEED)
            except SiteRefusal:  # an empty subset is refused: it holds no one
                idx = []
            out[(name, subset)] = {keys[i] for i in idx}
    return out


def _rewrite_index(site_yaml, edit) -> None:
    index = site_yaml.parent / "cache" / "index.csv"
    with index.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    rows = edit(rows)
    with index.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_site(tmp_path_factory.mktemp("membership"), "hospM", n=60, n_malignant=18, seed=5)


def _variant(base, tmp_path, name, edit):
    folder = tmp_path / name
    shutil.copytree(base.parent, folder)
    _rewrite_index(folder / "site.yaml", edit)
    return folder / "site.yaml"


def test_adding_or_removing_one_patient_anywhere_moves_no_one_else_in_any_unit(base, tmp_path):
    before = _membership(base)
    all_keys = set().union(*before.values())
    rng = random.Random(11)
    # One new patient inserted at a random position of index.csv (its stack is a copy of another's).
    new_stack = base.parent / "cache" / "stacks" / "hospM-new.npy"
    shutil.copy(base.parent / "cache" / "stacks" / "hospM-k000.npy", new_stack)

    def insert(rows):
        row = dict(rows[0], key="hospM-new", patient_id="PATIENT-new", file="stacks/hospM-new.npy")
        rows.insert(rng.randrange(len(rows)), row)
        return rows

    variants = {"added": (_variant(base, tmp_path, "added", insert), "hospM-new")}
    for n in range(3):
        gone = f"hospM-k{rng.randrange(60):03d}"
        edit = lambda rows, gone=gone: [r for r in rows if r["key"] != gone]  # noqa: E731
        variants[f"removed-{n}"] = (_variant(base, tmp_path, f"removed-{n}", edit), gone)
    new_stack.unlink()
    for label, (site_yaml, changed) in variants.items():
        after = _membership(site_yaml)
        assert after.keys() == before.keys()
        for unit, members in before.items():
            others_before = members - {changed}
            others_after = after[unit] - {changed}
            assert others_before == others_after, (label, unit)
        assert all_keys - {changed} <= set().union(*after.values())  # nobody else dropped out of every unit


def test_membership_counts_describe_the_site_and_decide_its_sit_outs(tmp_path):
    # hospC-k000..k008 with three malignant: under k = 3, seed 0 no malignant patient is left to train fold 0.
    site_yaml = make_site(tmp_path, "hospC", n=9, n_malignant=3, seed=3)
    site = open_site({"site-config": str(site_yaml)}, {})
    counts = membership(site, {"k": 3, "fold-seed": 0, "val-fraction": 0.25, "seed": 0})
    assert sum(counts["fold-pos"]) == 3 and sum(counts["fold-neg"]) == 6
    assert counts["all-pos"][2] == 3 and counts["all-neg"][2] == 6
    for f in range(3):
        idx, _ = select(site, "inner-train", 3, 0, f, 0.25, 0)
        labels = site.data.labels[idx]
        assert (int((labels == 1).sum()), int((labels == 0).sum())) == (counts["train-pos"][f], counts["train-neg"][f])
        assert (sit_out_reason(site, idx) is not None) == (0 in (counts["train-pos"][f], counts["train-neg"][f]))
    assert counts["train-pos"][0] == 0  # the case the protocol must handle (tests/test_protocols.py)
