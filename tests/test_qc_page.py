"""The QC page a radiologist signs off (cache/qc/index.html) and the QC picture per patient: orientation from the
stack's canonical axes whatever the stored orientation, legible labels, one row per manifest patient, the `qc`
verdict column, consistency across re-runs, privacy, and the page as a real browser (headless Chromium) shows it."""

from __future__ import annotations

import csv
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from dicomfactory import CENTER, Variant, t1_anatomy, write_patient, write_site_yaml
from PIL import Image, ImageFont

from common.config import load_site_config
from common.dicom import scan_tree
from common.geometry import Plane, canonical_axes
from common.manifest import ManifestRow
from common.prepare import prepare
from common.qc import BOX, CHANNEL_NAMES, LETTER, _stamp, font
from common.qcpage import PageRow, render
from common.stacks import OVERVIEW_PX, build_stack, edge_letters

COLUMNS = ["patient_id", "label", "lesion_sop_uid", "lesion_instance", "x0", "y0", "x1", "y1", "level", "qc"]
APSI = {"left": "A", "right": "P", "top": "S", "bottom": "I"}


def write_manifest(data: Path, rows: list[dict]) -> None:
    with (data / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def qc_info(tmp_path: Path, variant: Variant):
    row = write_patient(tmp_path, "P1", variant)
    mrow = ManifestRow(
        line=2,
        patient_id="P1",
        label=0,
        lesion_sop_uid=row["lesion_sop_uid"],
        box=(row["x0"], row["y0"], row["x1"], row["y1"]),
    )
    return build_stack(mrow, scan_tree(tmp_path).series["P1"], 48, 0.5).qc


@pytest.mark.parametrize(
    "variant",
    [Variant(), Variant(mirrored=True, flipped_normal=True), Variant(transposed=True)],
    ids=["plain", "mirrored+flipped", "transposed"],
)
def test_overview_is_the_whole_slice_on_the_canonical_axes(tmp_path, variant):
    """The overview is the phantom's analytic anatomy on the stack's axes (anterior left, superior up), with A/P/S/I
    letters and the box where the manifest put it, however the series was stored (mirrored+flipped is site06's
    profile)."""
    qc = qc_info(tmp_path, variant)
    assert qc.letters == APSI
    assert qc.overview.dtype == np.uint8 and max(qc.overview.shape) == OVERVIEW_PX
    assert qc.overview.shape == (256, 256)  # the whole 160 mm field, not a crop
    mm = 160 / OVERVIEW_PX
    x0, y0, x1, y1 = qc.overview_box
    assert (x1 - x0) * mm == pytest.approx(30, abs=1.5) and (y1 - y0) * mm == pytest.approx(25, abs=1.5)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    assert (cx * mm, cy * mm) == pytest.approx((80, 80), abs=1.5)  # the phantom's field is centred on the lesion
    # the analytic anatomy on the canonical axes: columns anterior → posterior (+y), rows superior → inferior (−z)
    t = (np.arange(OVERVIEW_PX) + 0.5) * mm - 80
    points = CENTER + t[None, :, None] * [0.0, 1, 0] + t[:, None, None] * [0.0, 0, -1]
    inner = (slice(4, -4), slice(4, -4))  # the outermost pixels blend with the air outside the stored image
    expected = t1_anatomy(points)[inner]
    assert np.corrcoef(qc.overview[inner].ravel(), expected.ravel())[0, 1] > 0.97
    assert np.corrcoef(qc.overview[inner].ravel(), expected[:, ::-1].ravel())[0, 1] < 0.5  # mirrored would fail
    cx0, cy0, cx1, cy1 = qc.overview_crop  # the tiles' field: the box's longer side × 2, centred on it
    assert (cx1 - cx0) * mm == pytest.approx(60, abs=1.5) and (cy1 - cy0) * mm == pytest.approx(60, abs=1.5)
    assert qc.t1_description == "t1_tse_sag" and qc.t2_description == "t2_tse_sag"
    assert qc.t1_spacing == (1.25, 1.25) and qc.slice_spacing == pytest.approx(4.0)
    assert qc.tile_spacing == pytest.approx(60 / 48)


def test_letters_follow_the_plane_so_a_wrong_series_shows():
    """The letters come from the stack's own axes: on an axial image the rows run left-right, so the page would
    show L/R where a sagittal shows S/I (the QC cue for an axial slice in the T1W row)."""
    sag = Plane(np.zeros(3), np.array([0.0, 1, 0]), np.array([0.0, 0, -1]), (1.0, 1.0), 10, 10)
    axial = Plane(np.zeros(3), np.array([1.0, 0, 0]), np.array([0.0, 1, 0]), (1.0, 1.0), 10, 10)
    mirrored = Plane(np.zeros(3), np.array([0.0, -1, 0]), np.array([0.0, 0, 1]), (1.0, 1.0), 10, 10)
    assert edge_letters(*canonical_axes(sag)) == APSI
    assert edge_letters(*canonical_axes(mirrored)) == APSI
    ax = edge_letters(*canonical_axes(axial))
    assert {ax["top"], ax["bottom"]} == {"L", "R"} and (ax["left"], ax["right"]) == ("A", "P")
    yaw = np.radians(40)  # far from sagittal (towards coronal): two letters, the stronger first
    oblique = Plane(np.zeros(3), np.array([-np.sin(yaw), np.cos(yaw), 0]), np.array([0.0, 0, -1]), (1.0, 1.0), 10, 10)
    assert edge_letters(*canonical_axes(oblique))["right"] == "PR"


def test_labels_are_legible():
    """Pillow's bitmap default font is ~11 px and runs "T1 0" into "T10"; the scalable one at 16 px is not."""
    assert isinstance(font(16), ImageFont.FreeTypeFont)
    label = _stamp("T1W  0 (lesion)", 16, (255, 255, 255))
    assert label.height >= 14
    rgba = np.asarray(label).astype(int)
    ink = ((rgba[..., 0] > 128) & (rgba[..., 3] > 128)).any(axis=0)  # columns with white glyph fill (not outline)
    gaps = np.diff(np.flatnonzero(np.diff(ink.astype(int)) != 0))[1::2]
    assert "T1W  0 (lesion)" in CHANNEL_NAMES
    assert gaps.argmax() == 2 and gaps[2] >= 6  # the widest gap is the one after "T1W": the words stand apart


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("qcsite")
    data = root / "data"
    data.mkdir()
    rows = [
        write_patient(data, "PLAIN"),
        write_patient(data, "FLIPPED", Variant(mirrored=True, flipped_normal=True), label="malignant"),
        write_patient(data, "SIGNED", Variant(transposed=True)),
        write_patient(data, "REJECTED"),
        write_patient(data, "TYPO"),
        {"patient_id": "NODICOM", "label": "benign", "lesion_instance": 5, "x0": 1, "y0": 1, "x1": 9, "y1": 9},
    ]
    rows[0]["level"] = "L1"
    rows[2]["qc"] = "OK"
    rows[3]["qc"] = "Reject: wrong level"
    rows[4]["qc"] = "rejet"
    write_manifest(data, rows)
    write_site_yaml(root)
    summary = prepare(load_site_config(root / "site.yaml"), workers=2)
    return root, rows, summary


def index(root: Path) -> dict[str, dict]:
    with (root / "cache" / "index.csv").open(encoding="utf-8") as fh:
        return {r["patient_id"]: r for r in csv.DictReader(fh)}


def page_rows(html: str) -> dict[str, str]:
    """Row id (p-<key>) → the row's HTML (one line per row)."""
    return {m.group(1): m.group(0) for m in re.finditer(r'^<div class="row [^"]*" id="p-([^"]*)">.*$', html, re.M)}


def test_qc_column_rejects_as_a_row_level_skip(site):
    root, _, _ = site
    idx = index(root)
    assert idx["REJECTED"]["status"] == "skipped"
    assert idx["REJECTED"]["reason"] == "manifest line 5: rejected at QC review (wrong level)"
    assert idx["TYPO"]["status"] == "skipped" and "qc 'rejet' is not understood" in idx["TYPO"]["reason"]
    assert idx["SIGNED"]["status"] == "ok"  # "OK" is an accept
    assert not (root / "cache" / "stacks" / f"{idx['REJECTED']['key']}.npy").exists()


def test_page_has_one_row_per_manifest_patient_and_no_identifier(site):
    root, rows, _ = site
    idx = index(root)
    page = root / "cache" / "qc" / "index.html"
    assert stat.S_IMODE(page.stat().st_mode) == 0o600
    html = page.read_text(encoding="utf-8")
    found = page_rows(html)
    assert set(found) == {r["key"] for r in idx.values()} and len(found) == len(rows)
    for pid, r in idx.items():
        row = found[r["key"]]
        assert f'<span class="status">{r["status"]}</span>' in row
        png = root / "cache" / "qc" / f"{r['key']}.png"
        assert (f'src="{r["key"]}.png"' in row) == (r["status"] == "ok") == png.is_file(), pid
    plain = found[idx["PLAIN"]["key"]]
    for text in ("<dd>L1</dd>", "<dd>benign</dd>", "t1_tse_sag", "t2_tse_sag", "1.25 × 1.25 mm", "<dd>2</dd>"):
        assert text in plain
    assert "<dd>OK</dd>" in found[idx["SIGNED"]["key"]]  # the verdict is shown
    assert "rejected at QC review (wrong level)" in found[idx["REJECTED"]["key"]]
    assert 'class="row skipped rejected"' in found[idx["REJECTED"]["key"]]
    identifiers = {r["patient_id"] for r in rows} | {r["lesion_sop_uid"] for r in rows if r.get("lesion_sop_uid")}
    assert not [i for i in identifiers if i in html]
    assert "DOE^" not in html
    assert "<script" not in html.lower() and "http" not in html  # static: nothing runs, nothing fetched


def test_qc_picture_is_legible_and_owner_only(site):
    root, _, _ = site
    key = index(root)["FLIPPED"]["key"]
    png = root / "cache" / "qc" / f"{key}.png"
    assert stat.S_IMODE(png.stat().st_mode) == 0o600
    im = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert im.shape[1] >= 256 + 3 * 192  # overview beside three tiles of at least 192 px
    yellow = np.all(np.abs(im - BOX) < 30, axis=-1).sum()
    green = np.all(np.abs(im - LETTER) < 30, axis=-1).sum()
    assert yellow > 7 * 100 and green > 7 * 4 * 10  # a box and four letters on the overview and every tile


def test_rerun_keeps_reused_tiles_and_follows_the_manifest(site, tmp_path):
    root, rows, _ = site
    copy = tmp_path / "site"
    shutil.copytree(root, copy, symlinks=True)
    idx = index(copy)
    qc = copy / "cache" / "qc"
    before = {pid: (qc / f"{r['key']}.png").stat().st_mtime_ns for pid, r in idx.items() if r["status"] == "ok"}
    rows = [dict(r) for r in rows]
    rows[1]["level"] = "L3"  # FLIPPED: the level is printed on its picture: rebuilt
    rows[2]["qc"] = "reject: motion"  # SIGNED: rejected now: its stack goes, the picture it was rejected on stays
    rows[3]["qc"] = ""  # REJECTED: verdict withdrawn: built now
    write_manifest(copy / "data", rows)
    summary = prepare(load_site_config(copy / "site.yaml"), workers=1)
    assert {o.row.patient_id for o in summary.outcomes if o.reused} == {"PLAIN"}
    new = index(copy)
    assert (qc / f"{new['PLAIN']['key']}.png").stat().st_mtime_ns == before["PLAIN"]
    signed = new["SIGNED"]
    assert signed["status"] == "skipped" and signed["reason"] == "manifest line 4: rejected at QC review (motion)"
    assert not (copy / "cache" / "stacks" / f"{signed['key']}.npy").exists()
    assert (qc / f"{signed['key']}.png").stat().st_mtime_ns == before["SIGNED"]
    assert new["REJECTED"]["status"] == "ok" and (qc / f"{new['REJECTED']['key']}.png").is_file()
    found = page_rows((qc / "index.html").read_text(encoding="utf-8"))
    assert set(found) == {r["key"] for r in new.values()}
    assert "reused from an earlier run" in found[new["PLAIN"]["key"]]
    assert "<dd>L3</dd>" in found[new["FLIPPED"]["key"]] and "<dd>this run</dd>" in found[new["FLIPPED"]["key"]]
    assert f'src="{signed["key"]}.png"' in found[signed["key"]] and "as built before the reject" in found[signed["key"]]
    assert 'class="row skipped rejected"' in found[signed["key"]]

    write_manifest(copy / "data", [r for r in rows if r["patient_id"] not in ("PLAIN", "SIGNED")])  # they leave
    prepare(load_site_config(copy / "site.yaml"), workers=1)
    found = page_rows((qc / "index.html").read_text(encoding="utf-8"))
    for gone in ("PLAIN", "SIGNED"):
        assert new[gone]["key"] not in found and not (qc / f"{new[gone]['key']}.png").exists()
    assert sorted(p.name for p in qc.iterdir()) == sorted(
        ["index.html"] + [f"{r['key']}.png" for pid, r in new.items() if r["status"] == "ok" and pid != "PLAIN"]
    )


def test_page_escapes_free_text_and_names_no_uid():
    """Series descriptions and reasons are free text: escaped, never markup; UIDs in reasons stay in index.csv."""
    details = {
        "t1_description": '<img src=x onerror="alert(1)">', "t2_description": "T2 & STIR", "letters": APSI,
        "t1_spacing": [0.5, 0.5], "t2_spacing": [0.6, 0.6], "slice_spacing": 4.0, "tile_spacing": 0.3,
    }  # fmt: skip
    rows = [
        PageRow("k1", True, False, 2, "L1", "benign", "ok", details=details),
        PageRow("", False, False, 3, "", "", "skipped", "manifest line 3: patient_id is empty"),
        PageRow("", False, False, 4, "", "", "skipped", "manifest line 4: patient_id is empty"),
        PageRow("k4", False, False, 5, "", "", "skipped", "manifest line 5: no DICOM for study_uid 1.2.826.0.1.99.7"),
        PageRow("k5", False, False, 6, "", "", "skipped", "manifest line 6: the T1W series holds two different files "
                "with one SOP Instance UID (PAT-77/t1/IM1 and again/PAT-77/t1/IM1); remove the wrong one"),
    ]  # fmt: skip
    html = render(rows, site="a&b")
    assert "<img src=x" not in html and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    assert "T2 &amp; STIR" in html and "site a&amp;b" in html
    assert "1.2.826.0.1.99.7" not in html and "study_uid &lt;UID, see index.csv&gt;" in html
    assert "PAT-77" not in html and "UID (&lt;files, see index.csv&gt;); remove" in html  # their folders name patients
    assert len(set(re.findall(r'<div class="row [^"]*" id="([^"]*)"', html))) == 5  # one anchor per row


# --- the page in a real browser ---------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y chromium; .ci/run installs it)"
)

# Written into a copy of the page in the test only: reports what the browser decoded and what the filter hides.
PROBE = """<script>
window.addEventListener("load", () => {
  const out = [];
  for (const img of document.images) out.push(img.getAttribute("src") + "=" + img.naturalWidth + "x" + img.naturalHeight);
  const shown = (id) => { document.getElementById(id).checked = true;
    return [...document.querySelectorAll(".rows > .row")].filter(r => getComputedStyle(r).display !== "none").length; };
  const filt = ["show-ok", "show-skipped", "show-rejected", "show-all"].map(id => id + "=" + shown(id));
  const pre = document.createElement("pre"); pre.id = "probe";
  pre.textContent = out.join(" ") + "\\n" + filt.join(" ");
  document.body.appendChild(pre);
});
</script>"""


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


@needs_chromium
def test_page_renders_in_headless_chromium(site, tmp_path):
    root, _, _ = site
    idx = index(root)
    qc = root / "cache" / "qc"
    html = (qc / "index.html").read_text(encoding="utf-8")
    probe = qc / "probe-test.html"  # beside the page, so the relative image paths resolve as from disk
    try:
        probe.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
        dom = chromium("--dump-dom", probe.as_uri(), tmp=tmp_path).stdout
    finally:
        probe.unlink(missing_ok=True)
    report = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert report, dom[-2000:]
    decoded, filters = report.group(1).strip().split("\n")
    ok = {r["key"] for r in idx.values() if r["status"] == "ok"}
    sizes = dict(item.split("=") for item in decoded.split())
    assert set(sizes) == {f"{k}.png" for k in ok}
    for src, size in sizes.items():
        assert size == "x".join(map(str, Image.open(qc / src).size)), src  # decoded at full size
    counts = dict(item.split("=") for item in filters.split())
    n_rej = 2  # REJECTED and TYPO: the qc column left them out
    assert counts == {
        "show-ok": str(len(ok)),
        "show-skipped": str(len(idx) - len(ok)),
        "show-rejected": str(n_rej),
        "show-all": str(len(idx)),
    }

    shot = tmp_path / "page.png"
    chromium(f"--screenshot={shot}", "--window-size=1400,1000", (qc / "index.html").as_uri(), tmp=tmp_path)
    im = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the first patient's picture is on screen, at 100 %: its box (yellow) and letters (green) are drawn
    assert np.all(np.abs(im - BOX) < 40, axis=-1).sum() > 500
    assert np.all(np.abs(im - LETTER) < 40, axis=-1).sum() > 200
    if os.environ.get("QC_SCREENSHOT"):  # to look at it: QC_SCREENSHOT=/tmp/qc.png pytest tests/test_qc_page.py
        shutil.copy(shot, os.environ["QC_SCREENSHOT"])
