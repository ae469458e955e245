"""Which app bundles (FABs) this site agrees to run: hash allow-list and version match, checked on the bundle's bytes.

In Flower the ClientApp's code comes from the coordinator's bundle and is placed first on `sys.path`, so it shadows the
site's installed `client/` and `common/`: whoever controls the bundle controls what the site's data is used for. The
site therefore pins the SHA-256 of the exact bundle bytes in `federation.approved_apps` (site.yaml). The check runs in
the site's own launcher (client/launcher.py) on the bytes it received, before the bundle is unpacked or imported, and
is pure standard library here, so nothing of the bundle can influence it.

The hash is Flower's own FAB hash (sha256 of the .fab file). `flwr build`/`flwr run` build bundles deterministically
(fixed zip dates, sorted files), so a site can also rebuild the bundle from the release it installed and compare.
Besides the hash the bundle's declared project and version must equal the installed `spinefed` package: bundle code
imports the site's installed dependencies, and a site that approved v0.2's hash must upgrade before running it.

An empty `approved_apps` approves nothing: every bundle is refused, with a message that names its hash and says how to
approve it (`client review`, then the hash under `federation.approved_apps`). There is no "run anything" setting: a
site that has not reviewed a bundle does not run it (deploy/SITE_IT.md).
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from dataclasses import dataclass, field
from importlib import metadata

from common.errors import SpineFedError

try:
    import tomllib
except ImportError:  # Python 3.10: flwr depends on tomli
    import tomli as tomllib

PROJECT = "spinefed"
HASH = re.compile(r"^[0-9a-f]{64}$")


class NotApproved(SpineFedError):
    """The bundle is not one this site approved, or it does not match the installed release.

    Its message goes back to the coordinator as the Error reply's reason: it names hashes and versions only."""

    exit_code = 1


@dataclass(frozen=True)
class BundleFile:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Bundle:
    """What a FAB holds, read without executing any of it."""

    sha256: str
    publisher: str
    name: str
    version: str
    components: dict = field(default_factory=dict)  # serverapp/clientapp references
    config: dict = field(default_factory=dict)  # the app's default run config ([tool.flwr.app.config])
    files: tuple[BundleFile, ...] = ()

    @property
    def short(self) -> str:
        return self.sha256[:12]


def bundle_hash(fab: bytes) -> str:
    """Flower's FAB hash: sha256 of the bundle's bytes."""
    return hashlib.sha256(fab).hexdigest()


def read_bundle(fab: bytes) -> Bundle:
    """Parse a FAB (zip with pyproject.toml and an .info/CONTENT manifest) and verify every file against the manifest.

    Raises NotApproved for anything malformed: a bundle that cannot be read cannot be approved."""
    digest = bundle_hash(fab)
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            contents = {n: zf.read(n) for n in names}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise NotApproved(f"app bundle {digest[:12]}: not a readable FAB ({exc.__class__.__name__})") from None
    if "pyproject.toml" not in contents:
        raise NotApproved(f"app bundle {digest[:12]}: no pyproject.toml")
    try:
        project = tomllib.loads(contents["pyproject.toml"].decode("utf-8"))
        app = project["tool"]["flwr"]["app"]
        name, version, publisher = project["project"]["name"], project["project"]["version"], app["publisher"]
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
        raise NotApproved(f"app bundle {digest[:12]}: pyproject.toml lacks [project] name/version or "
                          "[tool.flwr.app] publisher") from None  # fmt: skip
    manifest = {}
    for line in contents.get(".info/CONTENT", b"").decode("utf-8", "replace").splitlines():
        path, _, rest = line.partition(",")
        sha, _, _bits = rest.partition(",")
        manifest[path] = sha
    files = []
    for path in sorted(n for n in contents if n != ".info/CONTENT"):
        sha = hashlib.sha256(contents[path]).hexdigest()
        if manifest.get(path) != sha:
            # The bundle hash covers the bytes anyway; this catches a bundle whose own manifest lies (shown in review).
            raise NotApproved(f"app bundle {digest[:12]}: {path} does not match the bundle's CONTENT manifest")
        files.append(BundleFile(path, sha, len(contents[path])))
    return Bundle(digest, str(publisher), str(name), str(version), dict(app.get("components", {})),
                  dict(app.get("config", {})), tuple(files))  # fmt: skip


def installed_version() -> str:
    """Version of the installed `spinefed` package ("" when it is not installed as a distribution)."""
    try:
        return metadata.version(PROJECT)
    except metadata.PackageNotFoundError:
        return ""


def normalise(approved: list[str]) -> set[str]:
    """The allow-list as lowercase hex; entries may carry a `sha256:` prefix and a trailing comment after a space."""
    out = set()
    for entry in approved:
        value = entry.strip().split()[0].lower() if entry.strip() else ""
        out.add(value.removeprefix("sha256:"))
    return out


def invalid_entries(approved: list[str]) -> list[str]:
    """Entries of approved_apps that are not a full sha256 (a typo would otherwise silently refuse every run)."""
    return sorted(e for e in normalise(approved) if not HASH.match(e))


def how_to_approve(digest: str, run_id: int | None = None) -> str:
    """What the site does to approve a bundle; safe to send to the coordinator (no paths, only the key's name)."""
    review = f"`client review {run_id} --config site.yaml`" if run_id is not None else (
        "`client review --fab app.fab --config site.yaml`")  # fmt: skip
    return (f"to approve it, the site reviews it ({review}) and adds `- {digest}` under `federation: approved_apps:` "
            "in its site.yaml")  # fmt: skip


def check_bundle(fab: bytes, approved: list[str], version: str | None = None, run_id: int | None = None) -> Bundle:
    """Refuse (NotApproved) unless the bundle's hash is approved and its project/version equal the installed one.

    `version`: the installed package's version (default: looked up). An empty `approved` list refuses every bundle.
    `run_id` (when a run brought the bundle) makes the refusal name the `client review RUN` command."""
    bundle = read_bundle(fab)
    allowed = normalise(approved)
    what = f"app bundle {bundle.sha256} ({bundle.publisher}/{bundle.name} {bundle.version})"
    if not allowed:
        raise NotApproved(f"{what} is not approved at this site: federation.approved_apps is empty, so every bundle "
                          f"is refused; {how_to_approve(bundle.sha256, run_id)}")  # fmt: skip
    if bundle.sha256 not in allowed:
        raise NotApproved(f"{what} is not approved at this site: its sha256 is not in federation.approved_apps; "
                          f"{how_to_approve(bundle.sha256, run_id)}")  # fmt: skip
    if bundle.name != PROJECT:
        raise NotApproved(f"app bundle {bundle.short}: project {bundle.name!r}, this site runs {PROJECT!r} only")
    version = installed_version() if version is None else version
    if bundle.version != version:
        raise NotApproved(
            f"app bundle {bundle.short} is {PROJECT} {bundle.version} but this site has {PROJECT} "
            f"{version or '(not installed)'}; the versions must match (upgrade the site or ask the coordinator)"
        )
    return bundle


def build_local_bundle(app_dir) -> bytes:
    """The FAB that `flwr run` would build from `app_dir` (a checkout of the release): deterministic, so its hash is
    what the coordinator's run will carry when both use the same sources."""
    from pathlib import Path

    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))
