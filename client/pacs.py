"""Pull each manifest patient's sagittal T1W/T2W series from the hospital's PACS over DICOMweb (`data.source: dicomweb`).

Per manifest row: QIDO-RS studies by PatientID (and the row's study_uid when it has one), QIDO-RS series of those
studies, WADO-RS series *metadata* of their MR series (QIDO's series results lack TR/TE and geometry), then the same
choice of series as the folder path (common.stacks.study_series, common.series.choose_t1/choose_t2, find_lesion: one
implementation), and WADO-RS retrieval of only those series, in the transfer syntax the PACS stores
(`transfer-syntax=*`: nothing transcoded). Each instance is written as it arrives, atomically, unchanged, as
`<store>/<study uid>/<series uid>/<sop uid>.dcm`; `client prepare` then prepares from the store as from data.root.

Re-runs fetch only what is new or changed: `<store>/.spinefed/fetch-state.json` (owner-only, site-local) records, per
series, each instance's metadata digest and file size; an instance is fetched again when the server's metadata or the
file on disk no longer matches, and removed when the server no longer lists it. The state is saved every few seconds
and when a fetch stops, so an interrupted fetch resumes where it stopped (an instance written after the last save is
fetched again). Four patients are fetched at a time (PARALLEL).

Failures: the PACS unreachable, a TLS failure, 401/403 (and an answer that is not DICOM to the first query) stop
`client prepare` before anything is written (PacsError, exit 2); the same mid-way stop the fetch (the store keeps every
complete instance). A patient or study not found, no suitable series, a failed or refused (not DICOM) instance skip
that row: its reason, naming the manifest line, goes to index.csv, and the row is not prepared from whatever the store
holds of it (the PACS is the source; a partial or outdated copy could give another stack without anyone noticing).

Privacy: QIDO URLs carry the PatientID, so nothing here logs a URL, a response or a library exception's text; reasons
name the manifest line and UIDs (site-local: the local log and index.csv stay at the site). The auth file is read only
here and never logged. The libraries' own loggers (which log URLs and retry attempts) are held at ERROR.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
import requests
from pydicom.dataset import Dataset

from common.config import DicomWebSource, SiteConfig
from common.dicom import Series, header_of, non_image_kind
from common.errors import ConfigError, PatientSkipped, SpineFedError
from common.fileio import atomic_write_bytes, json_text
from common.geometry import lr_position
from common.manifest import ManifestRow, read_manifest
from common.series import choose_t1, choose_t2
from common.stacks import find_lesion, study_series

log = logging.getLogger(__name__)
for _name in ("dicomweb_client", "retrying", "urllib3"):  # they log URLs (PatientID in QIDO's query) and retries
    logging.getLogger(_name).setLevel(logging.ERROR)

STATE_DIR = ".spinefed"  # hidden: the folder scan skips it
STATE_FILE = "fetch-state.json"
STATE_VERSION = 1
UID = re.compile(r"^[0-9]+(\.[0-9]+)*\Z")  # what a server's UID must be before it names a file or folder
TIMEOUT = (10.0, 120.0)  # connect, read (s)
# Patients in flight at once: a PACS serves several requests at a time, and each patient is a chain of small requests
# (QIDO, metadata) whose latency dominates; four hide most of it without loading a clinical PACS noticeably.
PARALLEL = 4
SAVE_EVERY = 5.0  # s between state writes during a fetch (and once at its end)
JSON_TYPES = ("application/dicom+json", "application/json")
_STAT0 = os.stat_result((0,) * 10)  # metadata describes files not yet written: size/mtime unknown

# DICOM JSON tags (PS3.18 F.2): keyword lookups cost more than they say
PATIENT_ID, STUDY_UID, SERIES_UID, SOP_UID, MODALITY, SOP_CLASS = (
    "00100020",
    "0020000D",
    "0020000E",
    "00080018",
    "00080060",
    "00080016",
)

Progress = Callable[[int, int, int], None]  # (patients done, patients, bytes fetched)


class PacsError(SpineFedError):
    """The PACS cannot be used at all (unreachable, TLS, credentials refused, not a DICOMweb service): exit 2."""


class RowFailed(Exception):
    """One manifest row cannot be fetched; the text is its reason (names the manifest line, never the patient)."""


class BadAnswer(Exception):
    """The server answered one request with an error status or with something that is not what was asked for; the
    text completes "the PACS ..."."""


class NotDicom(BadAnswer):
    """The server answered with something that is not DICOM (JSON or Part-10) where DICOM was asked for."""


class _Stopped(Exception):
    """The fetch is ending early (another thread's PacsError, Ctrl-C): this thread stops too."""


class _Refused(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


# --- connection --------------------------------------------------------------------------------------------------


def read_auth(path: Path) -> tuple[str, str | tuple[str, str]]:
    """data.auth_file → ("basic", (user, password)) or ("bearer", token). Owner-only, one line; never logged."""
    key = "data.auth_file"
    try:
        st = path.stat()
    except OSError:
        raise ConfigError(f"key '{key}': {path} not found (one line: user:password, or Bearer <token>)") from None
    if st.st_mode & 0o077:
        raise ConfigError(
            f"key '{key}': {path} is readable by others (mode {st.st_mode & 0o777:o}); run chmod 600 {path}"
        )
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"key '{key}': {path} cannot be read ({exc.__class__.__name__})") from None
    if len(lines) == 1:
        text = lines[0]
        if text.lower().startswith("bearer "):
            token = text[7:].strip()
            if token and " " not in token:
                return "bearer", token
        elif ":" in text:
            user, _, password = text.partition(":")
            if user and password:
                return "basic", (user, password)
    raise ConfigError(f"key '{key}': {path} must hold one line: user:password, or Bearer <token> (content not shown)")


def _check_answer(response: requests.Response, *args, **kwargs) -> requests.Response:
    """Every answer, before dicomweb-client reads it: credentials refused and content that is not what was asked
    for (an HTML login page, a proxy's error page) become our exceptions instead of a parse error deep inside."""
    if response.status_code in (401, 403, 407):
        raise _Refused(response.status_code)
    if response.status_code != 200 or response.request.method != "GET":
        return response
    accept = response.request.headers.get("Accept", "")
    ctype = response.headers.get("Content-Type", "")
    media = ctype.split(";")[0].strip().lower()
    if "dicom+json" in accept and media not in JSON_TYPES:
        raise NotDicom(f"answered a DICOMweb query with {media or 'no content type'}, not DICOM JSON")
    if 'type="application/dicom"' in accept and media not in ("multipart/related", "application/dicom"):
        raise NotDicom(f"answered a retrieval with {media or 'no content type'}, not DICOM")
    return response


def _cause(exc: BaseException) -> str:
    """A connection failure's cause in a few words, never the URL (QIDO's carries the PatientID)."""
    text = str(exc)
    for pattern in (
        r"certificate verify failed: ([^(')\"]+)",
        r"\[SSL: [A-Z_]+\] ([^(')\"]+)",
        r"\[Errno -?\d+\] ([^'\")]+)",
    ):
        m = re.search(pattern, text)
        if m:
            return m.group(1).strip()
    if isinstance(exc, requests.Timeout):
        return "timed out"
    return exc.__class__.__name__


class Pacs:
    """One DICOMweb service (dicomweb-client over a requests session with the site's credentials and CA bundle)."""

    def __init__(self, src: DicomWebSource):
        from dicomweb_client.api import DICOMwebClient

        self.src = src
        kind, secret = read_auth(src.auth_file)
        if src.ca_bundle is not None and not src.ca_bundle.is_file():
            raise ConfigError(f"key 'data.ca_bundle': {src.ca_bundle} not found")
        session = requests.Session()
        # Straight to the PACS, inside the hospital: the environment's HTTPS_PROXY (set for the SuperNode's way out)
        # and ~/.netrc (other credentials) do not apply; data.ca_bundle, else the system's CAs, verify its certificate.
        session.trust_env = False
        if kind == "basic":
            session.auth = secret
        else:
            session.headers["Authorization"] = f"Bearer {secret}"
        session.verify = str(src.ca_bundle) if src.ca_bundle is not None else True
        session.hooks["response"] = [_check_answer]
        self.auth_kind = kind
        self.client = DICOMwebClient(src.url, session=session, timeout=TIMEOUT)
        # Fail fast: its retries (2 + 4 + 8 + 16 s) would hold an unreachable PACS's verdict for half a minute, and log
        # each attempt with the URL; a row that fails is fetched again by the next `client prepare`.
        self.client.set_http_retry_params(retry=False)

    @contextlib.contextmanager
    def _call(self, what: str) -> Iterator[None]:
        """Turn one request's failure into PacsError (the whole PACS) or RowFailed-worthy NotDicom / HTTP errors."""
        url = self.src.url
        try:
            yield
        except _Refused as exc:
            hint = {
                401: "the credentials in data.auth_file were refused",
                403: "the account in data.auth_file may not do this (read-only DICOMweb access to QIDO-RS and WADO-RS "
                "is needed)",
                407: "a proxy between here and the PACS wants credentials",
            }[exc.status]
            raise PacsError(f"PACS {url}: HTTP {exc.status} on {what}: {hint}") from None
        except requests.exceptions.SSLError as exc:
            raise PacsError(
                f"PACS {url}: TLS failure ({_cause(exc)}); check data.ca_bundle and the URL's host name"
            ) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise PacsError(f"PACS {url}: cannot reach it ({_cause(exc)})") from None
        except requests.exceptions.InvalidURL:
            raise PacsError(f"PACS {url}: not a usable URL (data.url)") from None
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            raise BadAnswer(f"answered HTTP {code} to {what}") from None
        except requests.RequestException as exc:  # the connection broke mid-answer, too many redirects, ...
            raise BadAnswer(f"failed during {what} ({exc.__class__.__name__})") from None
        except ValueError as exc:  # a body that does not parse as the JSON that its content type announced
            if isinstance(exc, BadAnswer):
                raise
            raise NotDicom(f"answered {what} with a body that is not DICOM JSON") from None

    def studies(self, patient_id: str, study_uid: str = "") -> list[dict]:
        """QIDO-RS studies of exactly this PatientID (QIDO matches `*`/`?` as wildcards: the answer is filtered)."""
        filters = {"PatientID": patient_id}
        if study_uid:
            filters["StudyInstanceUID"] = study_uid
        with self._call("a QIDO-RS study query"):
            found = self.client.search_for_studies(search_filters=filters, fields=["PatientID"])
        return [s for s in found if _value(s, PATIENT_ID).strip() == patient_id and UID.match(_value(s, STUDY_UID))]

    def series(self, study_uid: str) -> list[dict]:
        with self._call("a QIDO-RS series query"):
            found = self.client.search_for_series(study_instance_uid=study_uid)
        return [s for s in found if UID.match(_value(s, SERIES_UID))]

    def metadata(self, study_uid: str, series_uid: str) -> list[dict]:
        with self._call("a WADO-RS series metadata request"):
            return self.client.retrieve_series_metadata(study_uid, series_uid)

    def instances(self, study_uid: str, series_uid: str, sop_uid: str | None = None) -> Iterator[bytes]:
        """WADO-RS retrieval of a series (or one instance) in its stored transfer syntax, as the raw Part-10 bytes
        of each part. dicomweb-client's PS3.18 multipart decoder streams the parts; its public retrieve_* methods
        would parse each into a pydicom Dataset, and the store keeps the bytes the PACS holds, unchanged."""
        from dicomweb_client.web import _Transaction

        c = self.client
        if sop_uid is None:
            url = c._get_series_url(_Transaction.RETRIEVE, study_uid, series_uid)
        else:
            url = c._get_instances_url(_Transaction.RETRIEVE, study_uid, series_uid, sop_uid)
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        with self._call("a WADO-RS retrieval"):
            response = c._http_get(url, headers={"Accept": accept}, stream=True)
        if response.headers.get("Content-Type", "").lower().startswith("application/dicom"):
            with self._call("a WADO-RS retrieval"):
                body = response.content
            yield body  # one part, sent without the multipart envelope (some servers do)
            return
        parts = c._decode_multipart_message(response, stream=True)
        while True:
            with self._call("a WADO-RS retrieval"):
                part = next(parts, None)
            if part is None:
                return
            yield bytes(part)


def _refusal(exc: BadAnswer) -> str:
    return f"refused the PACS's answer: it {exc}" if isinstance(exc, NotDicom) else f"the PACS {exc}"


def _value(item: dict, tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or [""]
    v = values[0]
    return str(v.get("Alphabetic", "") if isinstance(v, dict) else v)


def instance_digest(item: dict) -> str:
    """What identifies an instance's version: its metadata without bulk-data URIs (they name the server)."""

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "BulkDataURI"}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return hashlib.sha256(json.dumps(strip(item), sort_keys=True).encode()).hexdigest()[:32]


def series_of(items: list[dict], folder: Path) -> Series | None:
    """A series' WADO-RS metadata → the project's Series, exactly as common.dicom reads the files' headers (the
    frames' paths are where the fetch will write the files). None when no instance is an image."""
    series = None
    for item in items:
        if non_image_kind(_value(item, SOP_CLASS)):  # "" for images, None when unknown: try it
            continue
        try:
            ds = Dataset.from_json(item, bulk_data_uri_handler=lambda tag, vr, uri: b"")
            s, frames = header_of(ds, str(folder / f"{_value(item, SOP_UID)}.dcm"), _STAT0)
        except Exception:  # an instance whose metadata cannot be read as an image: not a candidate slice
            continue
        if series is None:
            series = s
        series.frames.extend(frames)
    return series


# --- the fetch ---------------------------------------------------------------------------------------------------


@dataclass
class FetchSummary:
    rows: int = 0  # manifest rows asked for
    fetched: int = 0  # rows whose series are complete in the store
    failed: dict[int, str] = field(default_factory=dict)  # manifest line → reason (skips for common.prepare)
    new_instances: int = 0
    new_bytes: int = 0
    unchanged: int = 0
    removed: int = 0
    seconds: float = 0.0


class Store:
    """The local DICOM store and its fetch state (what was fetched, per series)."""

    def __init__(self, root: Path, url: str):
        self.root, self.url = root, url
        self.state_path = root / STATE_DIR / STATE_FILE
        self.series: dict[str, dict] = {}
        self.lock = threading.RLock()  # the fetch's threads share the state
        self._saved = 0.0
        try:
            obj = json.loads(self.state_path.read_text(encoding="utf-8"))
            if obj.get("version") == STATE_VERSION and obj.get("url") == url and isinstance(obj.get("series"), dict):
                self.series = obj["series"]
        except (OSError, ValueError, AttributeError):
            pass  # none yet, or unreadable: every instance is checked against the server and fetched again

    def open(self) -> None:
        (self.root / STATE_DIR).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # owner-only whatever the umask was when it was made
        os.chmod(self.root / STATE_DIR, 0o700)

    def save(self, at_most_every: float = 0.0) -> None:
        """Write the state (owner-only, atomically); with `at_most_every`, only when that many seconds have passed
        since the last write (a large store's state is megabytes: what a crash loses in between is fetched again)."""
        with self.lock:
            if at_most_every and time.monotonic() - self._saved < at_most_every:
                return
            obj = {"version": STATE_VERSION, "url": self.url, "series": self.series}
            atomic_write_bytes(self.state_path, json_text(obj).encode("utf-8"), 0o600)
            self._saved = time.monotonic()

    def folder(self, study_uid: str, series_uid: str) -> Path:
        return self.root / study_uid / series_uid

    def current(self, study_uid: str, series_uid: str, sop_uid: str, digest: str) -> bool:
        entry = self.series.get(series_uid, {}).get("instances", {}).get(sop_uid)
        if not entry or entry[0] != digest:
            return False
        try:
            return (self.folder(study_uid, series_uid) / f"{sop_uid}.dcm").stat().st_size == entry[1]
        except OSError:
            return False

    def put(self, study_uid: str, series_uid: str, sop_uid: str, digest: str, data: bytes) -> None:
        # not fsynced: the size recorded beside it finds a file a power loss emptied, and it is fetched again
        atomic_write_bytes(self.folder(study_uid, series_uid) / f"{sop_uid}.dcm", data, 0o600, durable=False)
        with self.lock:
            entry = self.series.setdefault(series_uid, {"study": study_uid, "instances": {}})
            entry["instances"][sop_uid] = [digest, len(data)]

    def drop(self, study_uid: str, series_uid: str, sop_uids: Iterable[str] | None = None) -> int:
        """Remove instances (all of the series when None) from the store and the state; returns how many files."""
        folder = self.folder(study_uid, series_uid)
        if sop_uids is None:
            n = sum(1 for p in folder.glob("*.dcm")) if folder.is_dir() else 0
            shutil.rmtree(folder, ignore_errors=True)
            with self.lock:
                self.series.pop(series_uid, None)
            return n
        n = 0
        known = self.series.get(series_uid, {}).get("instances", {})
        for sop in sop_uids:
            with self.lock:
                known.pop(sop, None)
            with contextlib.suppress(FileNotFoundError):
                (folder / f"{sop}.dcm").unlink()
                n += 1
        return n


def _sop_of(data: bytes) -> str:
    """The SOP Instance UID of a Part-10 file's bytes; NotDicom when they are not a DICOM file."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise NotDicom("sent a part that is not a DICOM file (no DICM preamble)")
    try:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return str(ds.SOPInstanceUID)
    except Exception:
        raise NotDicom("sent a part that is not a readable DICOM data set") from None


class Fetcher:
    """Fetch the manifest's patients into the store (see the module docstring)."""

    def __init__(self, pacs: Pacs, store: Store, progress: Progress | None = None, parallel: int = PARALLEL):
        self.pacs, self.store, self.parallel = pacs, store, parallel
        self.progress = progress or (lambda *a: None)
        self.summary = FetchSummary()
        self.stop_after: int | None = None  # tests: raise KeyboardInterrupt after this many new instances
        self._lock = threading.Lock()  # the summary's counters and the stop flag
        self._stop = False  # set when the fetch ends early: the other threads stop at their next instance

    def run(self, rows: list[ManifestRow]) -> FetchSummary:
        """Fetch every usable row, `parallel` patients at a time; rows that fail are in the summary's `failed`. A
        PacsError or Ctrl-C stops the fetch (the state is saved: the next run resumes)."""
        t0 = time.monotonic()
        usable = [r for r in rows if not r.problem]
        self.summary.rows = len(usable)
        self.store.open()
        pool = ThreadPoolExecutor(max_workers=max(1, self.parallel), thread_name_prefix="pacs-fetch")
        try:
            futures = {pool.submit(self.fetch_row, row): row for row in usable}
            for done, future in enumerate(as_completed(futures), start=1):
                try:
                    future.result()
                    self.summary.fetched += 1
                except RowFailed as exc:
                    self.summary.failed[futures[future].line] = str(exc)
                    log.warning("%s", exc)
                except OSError as exc:  # the store's disk (full, read-only, permissions): nothing more can be kept
                    raise SpineFedError(f"data.store {self.store.root}: cannot write ({exc.strerror or exc})") from None
                except (SpineFedError, _Stopped):
                    raise
                except Exception as exc:  # one patient's surprise never stops the others (as in common.prepare)
                    line = futures[future].line
                    log.error("unexpected error fetching manifest line %d (%s)", line, exc.__class__.__name__)
                    self.summary.failed[line] = (
                        f"manifest line {line}: unexpected error during the PACS fetch ({exc.__class__.__name__}); "
                        "see the prepare log"
                    )
                self.progress(done, len(usable), self.summary.new_bytes)
        except BaseException:
            self._stop = True
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.store.save()
            self.summary.seconds = time.monotonic() - t0
        return self.summary

    def fetch_row(self, row: ManifestRow) -> None:
        if self._stop:
            raise _Stopped
        line = f"manifest line {row.line}"
        try:
            studies = self.pacs.studies(row.patient_id, row.study_uid)
        except BadAnswer as exc:
            raise RowFailed(f"{line}: {_refusal(exc)}") from None
        if not studies:
            what = f"study_uid {row.study_uid} of this patient_id" if row.study_uid else "no study for this patient_id"
            raise RowFailed(f"{line}: not found on the PACS ({what}); check the patient_id, or that the PACS holds it")
        listed: list[tuple[str, str]] = []  # (study, series) of every series of the patient's studies
        candidates: list[Series] = []
        items_of: dict[str, tuple[str, list[dict]]] = {}
        try:
            for study in studies:
                study_uid = _value(study, STUDY_UID)
                for se in self.pacs.series(study_uid):
                    series_uid = _value(se, SERIES_UID)
                    listed.append((study_uid, series_uid))
                    modality = _value(se, MODALITY)
                    if modality and modality.upper() != "MR":
                        continue
                    items = [i for i in self.pacs.metadata(study_uid, series_uid) if UID.match(_value(i, SOP_UID))]
                    s = series_of(items, self.store.folder(study_uid, series_uid))
                    if s is not None and s.patient_id == row.patient_id:
                        candidates.append(s)
                        items_of[series_uid] = (study_uid, items)
        except BadAnswer as exc:
            raise RowFailed(f"{line}: {_refusal(exc)}") from None
        try:  # the folder path's rules, on the PACS's metadata
            series_list = study_series(row, candidates)
            t1 = choose_t1(series_list, row.lesion_sop_uid, row.lesion_instance, row.t1_series_uid, row.line)
            lesion = find_lesion(t1, row)
            t2 = choose_t2(series_list, t1, lr_position(lesion.plane), row.t2_series_uid, row.line)
        except PatientSkipped as exc:
            raise RowFailed(f"{exc} (searched on the PACS)") from None
        chosen = {t1.series_uid, t2.series_uid}
        for study_uid, series_uid in listed:  # a series chosen before and no longer: out of the store
            if series_uid not in chosen and (
                series_uid in self.store.series or self.store.folder(study_uid, series_uid).is_dir()
            ):
                self.summary.removed += self.store.drop(study_uid, series_uid)
        errors = []
        for series_uid in sorted(chosen):
            study_uid, items = items_of[series_uid]
            errors += self.fetch_series(study_uid, series_uid, items)
            self.store.save(at_most_every=SAVE_EVERY)
        if errors:
            more = f" and {len(errors) - 1} more" if len(errors) > 1 else ""
            raise RowFailed(
                f"{line}: fetch incomplete ({errors[0]}{more}); run `client prepare` again to fetch the rest"
            )

    def fetch_series(self, study_uid: str, series_uid: str, items: list[dict]) -> list[str]:
        """Bring one series up to date with the server; returns the instances' problems (empty: complete)."""
        wanted = {_value(i, SOP_UID): instance_digest(i) for i in items}
        known = set(self.store.series.get(series_uid, {}).get("instances", {}))
        self.summary.removed += self.store.drop(study_uid, series_uid, known - set(wanted))
        needed = {sop: d for sop, d in wanted.items() if not self.store.current(study_uid, series_uid, sop, d)}
        self.summary.unchanged += len(wanted) - len(needed)
        if not needed:
            return []
        problems: list[str] = []
        if len(needed) * 2 >= len(wanted):  # most of it: one streamed series request
            batches = [(None, self.pacs.instances(study_uid, series_uid))]
        else:  # a few: one request each
            batches = [(sop, self.pacs.instances(study_uid, series_uid, sop)) for sop in sorted(needed)]
        for asked, parts in batches:
            try:
                for data in parts:
                    sop = _sop_of(data)
                    if asked is not None and sop != asked:
                        raise NotDicom(f"sent instance {sop} where {asked} was asked for")
                    if sop not in needed:
                        continue  # unchanged (or not listed in the metadata): the store's copy stays
                    with self._lock:  # one writer at a time: a stop leaves exactly the instances counted
                        if self._stop:
                            raise _Stopped
                        self.store.put(study_uid, series_uid, sop, needed.pop(sop), data)
                        self.summary.new_instances += 1
                        self.summary.new_bytes += len(data)
                        if self.stop_after is not None and self.summary.new_instances >= self.stop_after:
                            self._stop = True
                            raise KeyboardInterrupt
            except NotDicom as exc:
                problems.append(f"refused an instance of series {series_uid}: the PACS {exc}")
            except BadAnswer as exc:
                problems.append(f"series {series_uid}: the PACS {exc}")
        if needed:
            problems.append(f"{len(needed)} instance(s) of series {series_uid} not received from the PACS")
        return problems


# --- entry points ------------------------------------------------------------------------------------------------


def connect(config: SiteConfig) -> tuple[Pacs, list[ManifestRow]]:
    """Read the manifest and ask the PACS one question (the first usable row's studies) before anything is written:
    a PACS that cannot be used at all raises PacsError (or ConfigError: auth file, CA bundle) here."""
    src = config.dicomweb
    rows = read_manifest(config.manifest)
    pacs = Pacs(src)
    first = next((r for r in rows if not r.problem), None)
    try:
        if first is not None:
            pacs.studies(first.patient_id)
        else:
            with pacs._call("a QIDO-RS study query"):
                pacs.client.search_for_studies(limit=1)
    except BadAnswer as exc:
        raise PacsError(f"PACS {src.url}: it {exc}; is data.url the DICOMweb service's root?") from None
    return pacs, rows


def fetch(
    config: SiteConfig,
    pacs: Pacs,
    rows: list[ManifestRow],
    progress: Progress | None = None,
    parallel: int = PARALLEL,
) -> FetchSummary:
    """Fetch every usable manifest row's series into data.store; rows that fail are in the summary's `failed`."""
    fetcher = Fetcher(pacs, Store(config.dicomweb.store, config.dicomweb.url), progress, parallel)
    summary = fetcher.run(rows)
    log.info("PACS fetch: %d of %d row(s) complete, %d new instance(s) (%d bytes), %d unchanged, %d removed, %.1f s",
             summary.fetched, summary.rows, summary.new_instances, summary.new_bytes, summary.unchanged,
             summary.removed, summary.seconds)  # fmt: skip
    return summary


def check_verdict(config: SiteConfig, n_patients: int = 3):
    """`client check`'s PACS line: reachable, authenticated, one QIDO query per first manifest patient (up to 3)."""
    from client.node import Verdict

    src = config.dicomweb
    try:
        pacs = Pacs(src)
        try:
            rows = [r for r in read_manifest(config.manifest) if not r.problem][:n_patients]
        except SpineFedError:
            rows = []
        if rows:
            found = [len(pacs.studies(r.patient_id, r.study_uid)) for r in rows]
            detail = (
                f"PACS {src.url}: reachable, authenticated ({pacs.auth_kind}); {sum(found)} stud"
                f"{'y' if sum(found) == 1 else 'ies'} for the first {len(rows)} manifest patient(s)"
                f" ({sum(1 for n in found if n)} of them found)"
            )
            return Verdict("PACS", any(found), detail + ("" if any(found) else ": none found; check the manifest"))
        with pacs._call("a QIDO-RS study query"):
            any_study = pacs.client.search_for_studies(limit=1)
        return Verdict("PACS", True, f"PACS {src.url}: reachable, authenticated ({pacs.auth_kind}); QIDO-RS answered "
                       f"({len(any_study)} study with limit=1); no manifest patient to look up")  # fmt: skip
    except BadAnswer as exc:
        return Verdict("PACS", False, f"PACS {src.url}: it {exc}; is data.url the DICOMweb service's root?")
    except SpineFedError as exc:
        return Verdict("PACS", False, str(exc))
