"""The work behind `client prepare`: a site's DICOM tree + manifest → the cache of 6-channel stacks, index.csv and QC montages.

Cache layout (DESIGN.md): stacks/<key>.npy, stacks/<key>.json (fingerprint of what built it, QC details, acquisition
levels; no identifiers), qc/<key>.png (QC image: whole lesion slice and montage; the page's details are in
stacks/<key>.json), qc/index.html (the QC page, common/qcpage.py), index.csv (the re-identification table, with the
acquisition levels after INDEX_COLUMNS: owner-only, never leaves the site).
Incremental: a patient whose manifest row, DICOM files and preprocessing settings are unchanged is not rebuilt, and
a file unchanged since the last scan is not read again (the scan cache beside the site secret: it holds identifiers).
Every file is written atomically, so a crash never leaves a half-written stack or index.

Where the time goes (cProfile of a one-worker cold run, 30 RLE patients of 2×15 slices at 320², about 36 ms CPU per
patient): resampling (map_coordinates, the floor now) about a quarter, the header walk of 30 files a tenth, the QC
picture's PNG a sixteenth; decoding (RLE straight from the file's bytes, common/decode.rle_frame) and the slice
percentiles (common/quantiles.py) little. Workers build and write temporary files; the parent makes them durable and
puts them in place meanwhile. A warm run stats the files, hashes the fingerprints and rewrites index.csv and the QC
page.

Logs name no DICOM file by its path below data.root: folder names in hospital exports are often PatientIDs or names.
The persistent prepare log (client/cli.py) formats through `LogScrubber`, which replaces every path below data.root
with a per-file pseudonym `file-<HMAC(site secret, relative path)>`; the pseudonym → path table lives only in the
owner-only cache (`log-files.tsv`), so site IT can still find the file, and the terminal (stderr) names the unreadable
files in full when a person runs `client prepare`: a screen is seen and gone, a log file is kept, copied and attached
to tickets.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import hashlib
import hmac
import io
import json
import logging
import logging.handlers
import multiprocessing
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from common.acquisition import ATTRIBUTES, COLUMNS, LEVELS_VERSION, UNKNOWN
from common.config import SiteConfig
from common.dicom import Series, scan_tree
from common.errors import PatientSkipped, SpineFedError
from common.fileio import atomic_write_bytes, commit, discard, json_text, npy_bytes, write_temp
from common.manifest import ManifestRow, read_manifest
from common.pseudonym import load_or_create_secret, pseudonym
from common.qc import save_montage
from common.qcpage import PageRow, write_page
from common.sitedata import INDEX_COLUMNS, LABEL_NAMES
from common.stacks import build_stack

log = logging.getLogger(__name__)
PIPELINE_VERSION = "stack-v1"  # bump when the stack's meaning changes: every cached stack is rebuilt

Progress = Callable[[str, int, int], None]  # (stage, done, total)
FILE_MAP = "log-files.tsv"  # in the cache: file pseudonym → path below data.root (owner-only, never leaves the site)
# What discovery read from each file, by path below data.root, with the file's size/mtime/inode/ctime, so that an
# unchanged tree is not read again. It holds PatientIDs, UIDs and paths, so it lives beside the site secret (outside the
# cache, whose only re-identification table is index.csv), owner-only; deleting it only costs one full scan. The
# version changes with anything that changes what a header yields.
SCAN_CACHE_SUFFIX = ".scan-cache.json"
SCAN_CACHE_VERSION = f"scan-v2 pydicom-{pydicom.__version__}"  # v2: acquisition tags (#24)


def file_pseudonym(secret: bytes, relpath: str) -> str:
    """A DICOM file's name in logs: HMAC of its path below data.root under the site secret (domain-separated from the
    patient keys, so a file pseudonym never equals a patient key)."""
    return "file-" + hmac.new(secret, b"file\x1f" + relpath.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


class LogScrubber(logging.Formatter):
    """A log formatter that replaces any path below data.root (in the message, an exception's text or a traceback)
    with its file pseudonym and records the pair in the cache's FILE_MAP. A path runs from the root to the end of
    the line or a quote (file names can hold spaces: better to hide a little more than to leak half a folder name).
    The secret is read only when a path needs scrubbing (after `prepare` has created it)."""

    def __init__(self, config: SiteConfig, fmt: str | None = None):
        super().__init__(fmt)
        self.config = config
        roots = {str(config.data_root), str(config.data_root.resolve())}
        alt = "|".join(re.escape(r.rstrip("/")) for r in sorted(roots, key=len, reverse=True))
        self.pattern = re.compile(rf"(?:{alt})(/[^\n'\"]*)?")
        self.seen: set[str] = set()

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return self.pattern.sub(self._replace, text) if self.pattern.search(text) else text

    def _replace(self, match: re.Match) -> str:
        rel = (match.group(1) or "").strip("/").rstrip(" .,;:)")
        if not rel:
            return match.group(0)  # data.root itself names no patient
        tail = match.group(1)[match.group(1).find(rel) + len(rel) :]
        try:
            name = file_pseudonym(load_or_create_secret(self.config.secret), rel)
            if name not in self.seen:
                self.seen.add(name)
                remember_file(self.config.cache, name, rel)
        except Exception:  # a log formatter: if it raised, logging would print the record, path and all
            name = "file-(hidden)"
        return f"<data.root>/{name}{tail}"


def remember_file(cache: Path, name: str, rel: str) -> None:
    """Append `name<TAB>path below data.root` to the cache's owner-only FILE_MAP (site IT's way back to the file)."""
    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache / FILE_MAP, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(f"{name}\t{rel}\n")


@dataclass
class Outcome:
    row: ManifestRow
    key: str
    status: str  # ok | skipped
    reason: str = ""
    reused: bool = False
    attributes: dict[str, str] = field(default_factory=dict)  # acquisition levels (ok rows), from stacks/<key>.json


@dataclass
class PrepareSummary:
    cache: Path
    outcomes: list[Outcome] = field(default_factory=list)
    dicom_files: int = 0  # every DICOM file: images, non-image objects, duplicates, unreadable
    non_dicom_files: int = 0
    unreadable_files: int = 0  # image files that cannot be read
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, why): for the terminal, never a log
    non_image: Counter = field(default_factory=Counter)  # non-image DICOM objects by kind ("SR", "RT", ...)
    duplicates: int = 0  # files already found under the same SOP Instance UID with the same content

    @property
    def non_image_files(self) -> int:
        return sum(self.non_image.values())

    @property
    def ok(self) -> int:
        return sum(o.status == "ok" for o in self.outcomes)

    @property
    def skipped(self) -> int:
        return sum(o.status == "skipped" for o in self.outcomes)

    @property
    def reused(self) -> int:
        return sum(o.reused for o in self.outcomes)

    def reasons(self) -> Counter:
        """Skip reasons grouped by kind (the line number and details removed)."""
        return Counter(reason_kind(o.reason) for o in self.outcomes if o.status == "skipped")


def reason_kind(reason: str) -> str:
    text = re.sub(r"^manifest line \d+: ", "", reason)
    return re.split(r" \(|;|: ", text, maxsplit=1)[0]


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def clean_reason(text: str) -> str:
    """A reason on one line: line breaks, tabs and other control characters (from exception texts, file names or
    manifest cells) become single spaces, so that index.csv holds one record per line for every reader. Never cut."""
    return " ".join(_CONTROL.sub(" ", str(text)).split())


def csv_cell(text: str) -> str:
    """A free-text cell on one line that a spreadsheet will not run as a formula: a leading = + - @ gets a ' in front,
    as OWASP advises for CSV exports (tab and CR are gone already). Only for text that nothing reads back as a value
    (reasons); never for patient_id, which people and scripts join on."""
    text = clean_reason(text)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def fingerprint(row: ManifestRow, series: list[Series], size: int, margin: float) -> str:
    """Hash of everything a stack depends on; holds no identifier itself."""
    h = hashlib.sha256()
    h.update(repr((PIPELINE_VERSION, size, margin, row.fields())).encode())
    for s in sorted(series, key=lambda s: s.series_uid):
        h.update(s.series_uid.encode())
        for f in sorted(s.frames, key=lambda f: (f.sop_uid, f.frame or 0)):
            h.update(repr((f.sop_uid, f.frame, f.size, f.mtime_ns)).encode())
    return h.hexdigest()


def scan_cache_path(config: SiteConfig) -> Path:
    return config.secret.with_name(config.secret.name + SCAN_CACHE_SUFFIX)


def _load_scan_cache(path: Path, root: Path) -> dict:
    """The previous scan's table for this data.root, or {} (none, another version, another root, unreadable)."""
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
        if obj["version"] == SCAN_CACHE_VERSION and obj["root"] == str(root.resolve()):
            return obj["files"] if isinstance(obj["files"], dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {}


def _save_scan_cache(path: Path, root: Path, files: dict) -> None:
    obj = {"version": SCAN_CACHE_VERSION, "root": str(root.resolve()), "files": files}
    # not fsynced: a cache, and one that a power loss can only make unreadable (then: a full scan)
    atomic_write_bytes(path, json.dumps(obj, separators=(",", ":")).encode("utf-8"), 0o600, durable=False)


def _stack_paths(cache: Path, key: str) -> tuple[Path, Path, Path]:
    return cache / "stacks" / f"{key}.npy", cache / "stacks" / f"{key}.json", cache / "qc" / f"{key}.png"


def _current_attributes(cache: Path, key: str, fp: str) -> dict[str, str] | None:
    """The acquisition levels stored with the patient's stack when the stack is current (same fingerprint, QC
    details and levels read under this LEVELS_VERSION); None when it must be rebuilt."""
    npy, meta, png = _stack_paths(cache, key)
    try:
        info = json.loads(meta.read_text())
        # "qc": the QC page's details; "attributes": the acquisition levels (#24). A cache from before either is
        # rebuilt once
        if not (npy.is_file() and png.is_file() and info["fingerprint"] == fp and "qc" in info):
            return None
        if info.get("attributes-version") != LEVELS_VERSION or not isinstance(info.get("attributes"), dict):
            return None
        return {name: str(info["attributes"].get(name) or UNKNOWN) for name in ATTRIBUTES}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build_one(job: tuple) -> tuple[str, str, list, dict]:
    """Worker: build, then write the stack, the QC image and the fingerprint with the QC page's details as temporary
    files. Returns (status, reason, [(temporary file, target)]): the parent makes them durable and puts them in
    place, in that order (fingerprint last, so that a crash in between leaves the patient to be rebuilt), while the
    workers go on building: an fsync waits for the disk, and the workers need not."""
    row, series, key, fp, cache, size, margin = job
    pending: list[tuple[str, Path]] = []
    try:
        result = build_stack(row, series, size, margin)
        npy, meta, png = _stack_paths(cache, key)
        pending.append((write_temp(npy, npy_bytes(result.stack), 0o600), npy))
        buf = io.BytesIO()
        qc = result.qc
        series = "   ".join(
            f"{w}: {d[:40] or '(no description)'}" for w, d in (("T1W", qc.t1_description), ("T2W", qc.t2_description))
        )
        title = "   ".join(x for x in (key[:12], row.level, LABEL_NAMES.get(row.label, ""), series) if x)
        save_montage(result.stack, result.box, buf, qc, title)
        pending.append((write_temp(png, buf.getvalue(), 0o600), png))
        info = {"fingerprint": fp, "box": result.box, "shape": list(result.stack.shape), "qc": qc.to_json()}
        info |= {"attributes": result.attributes, "attributes-version": LEVELS_VERSION}
        pending.append((write_temp(meta, json_text(info).encode("utf-8"), 0o600), meta))
        return "ok", "", pending, result.attributes
    except PatientSkipped as exc:
        discard(pending)
        return "skipped", str(exc), [], {}
    except Exception as exc:  # one broken patient never stops the others
        discard(pending)
        log.exception("unexpected error on manifest line %d", row.line)
        reason = f"manifest line {row.line}: unexpected error ({exc.__class__.__name__}); see the prepare log"
        return "skipped", reason, [], {}


def _commit(row: ManifestRow, pending: list) -> tuple[str, str] | None:
    """Put a worker's files in place (durably); a failure skips the patient like a failure in the worker would."""
    try:
        commit(pending)
        return None
    except OSError as exc:
        log.exception("unexpected error on manifest line %d", row.line)
        return "skipped", f"manifest line {row.line}: unexpected error ({exc.__class__.__name__}); see the prepare log"


def write_index(cache: Path, outcomes: list[Outcome]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(INDEX_COLUMNS + COLUMNS)
    for o in outcomes:
        label = LABEL_NAMES.get(o.row.label, "")
        ok = o.status == "ok"
        file = f"stacks/{o.key}.npy" if ok else ""
        levels = [o.attributes.get(name, UNKNOWN) if ok else "" for name in ATTRIBUTES]
        w.writerow([o.row.patient_id, o.key, label, o.status, csv_cell(o.reason), file, *levels])
    atomic_write_bytes(cache / "index.csv", buf.getvalue().encode("utf-8"), 0o600)


def _remove_stale(cache: Path, keep: set[str], keep_pictures: set[str] = frozenset()) -> None:
    """Stacks of patients no longer in the manifest (or now skipped) are removed: no orphaned patient data. The QC
    picture of a patient the radiologist rejected stays, so the page still shows what was rejected."""
    for folder, suffixes, kept in (("stacks", (".npy", ".json"), keep), ("qc", (".png",), keep | keep_pictures)):
        d = cache / folder
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.suffix in suffixes and p.stem not in kept or p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)


def prepare(
    config: SiteConfig,
    progress: Progress | None = None,
    workers: int | None = None,
    skips: dict[int, str] | None = None,
) -> PrepareSummary:
    """Prepare the site's cache. Raises ManifestError/ConfigError before touching the cache when unusable.
    `skips`: manifest line → reason for rows to skip whatever the tree holds (a failed PACS fetch, client/pacs.py)."""
    rows = read_manifest(config.manifest)
    if not config.data_root.is_dir():
        raise SpineFedError(f"{config.file}: data.root {config.data_root} is not a folder")
    cache = config.cache
    if cache.resolve() == config.data_root.resolve() or config.data_root.resolve() in cache.resolve().parents:
        log.warning("the cache lies inside the DICOM tree; discovery will skip its files (not DICOM)")
    secret = load_or_create_secret(config.secret)
    n_workers = workers or config.workers or os.cpu_count() or 1
    progress = progress or (lambda *a: None)

    with (
        _worker_logs() as (initializer, initargs),
        (
            ProcessPoolExecutor(max_workers=n_workers, initializer=initializer, initargs=initargs)
            if n_workers > 1
            else _Serial()
        ) as pool,
    ):
        known = _load_scan_cache(scan_cache_path(config), config.data_root)
        scan = scan_tree(
            config.data_root,
            map_fn=lambda fn, items: pool.map(fn, items, chunksize=16),
            progress=lambda i: progress("scan", i, 0),
            known=known,
        )
        summary = PrepareSummary(
            cache,
            dicom_files=scan.dicom_files,
            non_dicom_files=scan.non_dicom_files,
            unreadable_files=len(scan.unreadable),
            unreadable=[(path, clean_reason(why)) for path, why in scan.unreadable],
            non_image=Counter(scan.non_image),
            duplicates=scan.duplicates,
        )

        def logged_name(path: str) -> str:
            # by pseudonym: the path below data.root may hold a PatientID (messages are scrubbed by LogScrubber too)
            rel = os.path.relpath(path, config.data_root)
            name = file_pseudonym(secret, rel)
            remember_file(cache, name, rel)
            return name

        for path, why in scan.unreadable:
            name = logged_name(path)
            log.warning("unreadable DICOM file %s: %s", name, clean_reason(str(why).replace(str(path), name)))
        if scan.non_image:
            kinds = ", ".join(f"{k} {n}" for k, n in scan.non_image.most_common())
            log.info("non-image DICOM ignored: %d (%s)", scan.non_image_files, kinds)
        if scan.duplicates:
            log.info("%d duplicate file(s) ignored (same SOP Instance UID and pixel data as a file already found)",
                     scan.duplicates)  # fmt: skip
        for a, b, _ in scan.conflicts:
            root = config.data_root
            log.warning("%s and %s hold one SOP Instance UID with different content; a patient whose stack would use "
                        "them is skipped", logged_name(str(root / a)), logged_name(str(root / b)))  # fmt: skip
        for sub in ("stacks", "qc"):
            (cache / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(cache, 0o700)
        if scan.cache != known:
            _save_scan_cache(scan_cache_path(config), config.data_root, scan.cache)

        jobs, outcomes = [], []
        for row in rows:
            key = pseudonym(secret, row.patient_id) if row.patient_id else ""
            out = Outcome(row, key, "skipped", row.problem or (skips or {}).get(row.line, ""))
            outcomes.append(out)
            if out.reason:
                continue
            series = scan.series.get(row.patient_id, [])
            if not series:  # unreadable image files might be this patient's; non-image objects never are
                n = len(scan.unreadable)
                hint = f" ({n} unreadable image file{'s' if n > 1 else ''} below data.root, listed in the prepare log)"
                hint = hint if n else ""
                out.reason = f"manifest line {row.line}: no DICOM found for this patient_id below data.root{hint}"
                continue
            fp = fingerprint(row, series, config.preprocess.size, config.preprocess.margin)
            levels = _current_attributes(cache, key, fp)
            if levels is not None:
                out.status, out.reason, out.reused, out.attributes = "ok", "", True, levels
                continue
            jobs.append((out, (row, series, key, fp, cache, config.preprocess.size, config.preprocess.margin)))

        total = len(rows)
        done = total - len(jobs)
        progress("stacks", done, total)
        built = pool.map(_build_one, [j for _, j in jobs], chunksize=1)
        for (out, _), (status, reason, pending, levels) in zip(jobs, built):
            failed = _commit(out.row, pending) if pending else None  # while the workers build the next ones
            out.status, out.reason = failed or (status, reason)
            out.attributes = levels if out.status == "ok" else {}
            done += 1
            progress("stacks", done, total)

    for o in outcomes:  # one line each, never cut: index.csv, the QC page and the summary show the same text
        o.reason = clean_reason(o.reason)
    summary.outcomes = outcomes
    _remove_stale(cache, {o.key for o in outcomes if o.status == "ok"}, {o.key for o in outcomes if o.row.qc_excluded})
    write_index(cache, outcomes)
    write_page(cache, [_page_row(cache, o) for o in outcomes], config.site)
    return summary


def _page_row(cache: Path, o: Outcome) -> PageRow:
    """One QC page row: what the manifest says now, and the QC details the worker left in the cache."""
    details = {}
    if o.status == "ok":
        # missing details: the page says so, and the next prepare rebuilds them (_current_attributes wants them)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            details = json.loads(_stack_paths(cache, o.key)[1].read_text(encoding="utf-8"))["qc"]
    return PageRow(
        key=o.key,
        picture=bool(o.key) and _stack_paths(cache, o.key)[2].is_file(),
        rejected=o.row.qc_excluded,
        line=o.row.line,
        level=o.row.level,
        label=LABEL_NAMES.get(o.row.label, ""),
        status=o.status,
        reason=o.reason,
        qc=o.row.qc,
        reused=o.reused,
        details=details,
        attributes=o.attributes,
    )


def _worker_init(queue, level: int) -> None:
    """Pool worker start: every log record (pydicom's logger, decoder warnings, Python warnings) goes to the
    parent's handlers, i.e. the prepare log, never to the worker's stderr (whatever the start method)."""
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(queue)]
    root.setLevel(level)
    logging.captureWarnings(True)
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    """A worker allocates and frees the same few MB of arrays for every slice; glibc returns blocks that large to
    the kernel at once and maps them again, a page fault per 4 KB: a tenth of a stack's time. Keeping them in the
    worker's heap (glibc's own knobs, as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ would set them) costs at
    most the worker's peak; elsewhere (no glibc) nothing changes."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class _Dispatch(logging.Handler):
    """Hands a worker's record to the parent's logger of the same name (and so to the prepare log's handler)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


@contextlib.contextmanager
def _worker_logs():
    """(initializer, initargs) for the process pool, and Python warnings routed to logging in this process too,
    for the length of a prepare; undone afterwards."""
    ctx = multiprocessing.get_context()
    queue = ctx.Queue()
    listener = logging.handlers.QueueListener(queue, _Dispatch())
    capturing = warnings.showwarning
    logging.captureWarnings(True)
    listener.start()
    try:
        yield _worker_init, (queue, logging.getLogger().getEffectiveLevel())
    finally:
        listener.stop()  # after the pool has shut down: every worker record is in the queue by then
        queue.close()
        if warnings.showwarning is not capturing:
            logging.captureWarnings(False)


class _Serial:
    """Stand-in for a process pool when one worker is asked for (debugging, tiny sites)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items, chunksize=1):
        return map(fn, items)
