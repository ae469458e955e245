"""Site governance and the deploy kit: bundle approval before any bundle code runs, review, revocation, renewal.

All cheap: bundles are built in memory with Flower's own FAB builder, the launcher's gate is exercised on a stand-in
of Flower's run_clientapp module, and revocation runs against a fake `flwr` call; no SuperLink is started.
"""

from __future__ import annotations

import json
import subprocess
import types
from pathlib import Path

import pytest

from client import approval, launcher
from client.approval import NotApproved, bundle_hash, check_bundle, read_bundle
from tests.fakes import VERSION, build_fab, flip_one_byte

REPO = Path(__file__).resolve().parent.parent


def test_approved_bundle_passes_and_one_modified_byte_is_refused():
    fab = build_fab()
    assert bundle_hash(fab) == bundle_hash(build_fab())  # deterministic: a site can rebuild and compare
    approved = [bundle_hash(fab)]
    bundle = check_bundle(fab, approved, version=VERSION)
    assert bundle.name == "spinefed" and bundle.version == VERSION
    assert any(f.path == "client/app.py" for f in bundle.files)

    tampered = flip_one_byte(fab, "client/app.py")
    assert bundle_hash(tampered) != bundle_hash(fab)
    with pytest.raises(NotApproved, match="not approved at this site"):
        check_bundle(tampered, approved, version=VERSION)


def test_an_empty_allow_list_refuses_every_bundle_and_says_how_to_approve(tmp_path):
    fab = build_fab()
    digest = bundle_hash(fab)
    with pytest.raises(NotApproved) as refused:
        check_bundle(fab, [], version=VERSION, run_id=12)
    text = str(refused.value)
    assert "not approved at this site" in text and "federation.approved_apps is empty" in text
    assert digest in text and "`client review 12 --config site.yaml`" in text and f"`- {digest}`" in text
    assert str(tmp_path) not in text  # the reason goes to the coordinator: no paths
    with pytest.raises(NotApproved, match=r"its sha256 is not in federation.approved_apps.*client review --fab"):
        check_bundle(fab, ["0" * 64], version=VERSION)
    # the launcher's gate: same refusal, recorded for review; a site config without the key refuses too
    cfg = _site(tmp_path, [])
    run = types.SimpleNamespace(run_id=3, fab_id="spinefed/spinefed", fab_version=VERSION, override_config={})
    with pytest.raises(NotApproved, match="federation.approved_apps is empty"):
        launcher.approve_or_refuse(fab, run, str(cfg))
    record = json.loads((tmp_path / "hospital-a" / "cache-review" / "runs" / "3.json").read_text())
    assert record["verdict"].startswith("refused: ") and record["fab_hash"] == digest


def test_client_check_fails_on_an_empty_or_mistyped_allow_list(tmp_path):
    from client.node import approved_apps_verdict, bundle_verdicts
    from common.config import load_site_config

    fab = build_fab()
    (tmp_path / "app.fab").write_bytes(fab)
    empty = load_site_config(_site(tmp_path / "e", []))
    verdict = approved_apps_verdict(empty)
    assert not verdict.ok and "is empty: every app bundle will be refused" in verdict.detail
    assert f"client review --fab app.fab --config {empty.file}" in verdict.detail
    bundle = {v.what: v for v in bundle_verdicts(empty, tmp_path / "app.fab")}["app bundle"]
    assert not bundle.ok and bundle_hash(fab) in bundle.detail
    typo = load_site_config(_site(tmp_path / "t", ["abc123"]))
    assert not approved_apps_verdict(typo).ok and "abc123" in approved_apps_verdict(typo).detail
    assert approved_apps_verdict(load_site_config(_site(tmp_path / "ok", [bundle_hash(fab)]))).ok


def test_the_coordinators_bundle_hash_is_deterministic_and_what_sites_approve(tmp_path):
    from client.approval import read_bundle
    from server.readiness import app_version, review_package
    from tests.deployhelpers import app_bundle_hash

    exp = tmp_path / "experiment.yaml"
    exp.write_text("rounds: 1\n")
    folder, digest = review_package(REPO, exp, tmp_path / "review")
    # A second, independent build gives the same bytes: `flwr run` builds with this same function
    # (flwr.cli.build.build_fab_from_disk), so the hash a site approves is the one the run carries.
    assert app_bundle_hash() == digest == bundle_hash((folder / "app.fab").read_bytes())
    assert f"{digest}  app.fab" in (folder / "SHA256SUMS").read_text()
    # The release the coordinator states for the sites is the one the bundle carries.
    assert app_version(REPO) == read_bundle((folder / "app.fab").read_bytes()).version


def test_the_bundle_holds_every_module_the_apps_can_import():
    """`flwr run` ships only fab-include's files, and a site's ClientApp imports from the bundle before the installed
    release: a module left out (e.g. a new subpackage) fails every run with ModuleNotFoundError at the sites."""
    import io
    import zipfile

    fab = approval.build_local_bundle(REPO)
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    modules = {str(p.relative_to(REPO)) for pkg in ("common", "client", "server") for p in (REPO / pkg).rglob("*.py")}
    assert modules and modules <= names, sorted(modules - names)
    assert not any(n.startswith(("tests/", "simulations/", "deploy/")) for n in names)


def test_manifest_mismatch_and_garbage_are_refused():
    import io
    import zipfile

    fab = build_fab()
    out = io.BytesIO()  # change a file but leave the CONTENT manifest lying about it
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, b"evil()\n" if info.filename == "client/app.py" else src.read(info.filename))
    with pytest.raises(NotApproved, match="CONTENT manifest"):
        read_bundle(out.getvalue())
    with pytest.raises(NotApproved, match="not a readable FAB"):
        read_bundle(b"not a zip")


def test_version_must_match_the_installed_release():
    fab = build_fab(version="0.2.0")
    with pytest.raises(NotApproved, match=r"spinefed 0\.2\.0 but this site has spinefed 0\.1\.0"):
        check_bundle(fab, [bundle_hash(fab)], version="0.1.0")
    assert approval.installed_version() == VERSION  # the project installed in this venv


def test_allow_list_normalisation_and_typos():
    digest = "A" * 64
    assert approval.normalise([f"sha256:{digest}  # release 0.1.0"]) == {"a" * 64}
    assert approval.invalid_entries(["abc", "sha256:" + "b" * 64]) == ["abc"]


def _site(tmp_path: Path, approved: list[str]) -> Path:
    from tests.tinysites import make_site

    cfg = make_site(tmp_path, "hospital-a", n=2, n_malignant=1)
    body = "".join(f"\n    - {h}" for h in approved)
    cfg.write_text(cfg.read_text() + "federation:\n  approved_apps:" + (body if approved else " []") + "\n")
    return cfg


def test_launcher_gate_refuses_before_install_and_records_the_run(tmp_path):
    fab = build_fab()
    tampered = flip_one_byte(fab, "client/app.py")
    cfg = _site(tmp_path, [bundle_hash(fab)])
    installed = []
    run = types.SimpleNamespace(run_id=7, fab_id="spinefed/spinefed", fab_version=VERSION, fab_hash="x",
                                override_config={"experiment": "/coordinator/exp.yaml"})  # fmt: skip
    rc = types.SimpleNamespace(  # stand-in for flwr.supernode.runtime.run_clientapp
        pull_task_input=lambda client: ("msg", "ctx", run, "fab"),
        install_from_fab=lambda fab_file, *a, **k: installed.append(fab_file) or Path("/installed"),
    )
    launcher.install_gate(rc)
    import os

    os.environ[launcher.ENV_CONFIG] = str(cfg)
    try:
        rc.pull_task_input(None)
        with pytest.raises(NotApproved):
            rc.install_from_fab(tampered, skip_prompt=True)
        assert installed == []  # refused before unpacking: no bundle code could have run
        assert rc.install_from_fab(fab, skip_prompt=True) == Path("/installed")
        assert installed == [fab]
    finally:
        del os.environ[launcher.ENV_CONFIG]
    record = json.loads((tmp_path / "hospital-a" / "cache-review" / "runs" / "7.json").read_text())
    assert record["verdict"] == "approved" and record["fab_hash"] == bundle_hash(fab)
    assert (tmp_path / "hospital-a" / "cache-review" / "bundles" / f"{bundle_hash(tampered)}.fab").is_file()


def test_launcher_refuses_everything_without_a_site_config(monkeypatch):
    monkeypatch.delenv(launcher.ENV_CONFIG, raising=False)
    with pytest.raises(NotApproved, match="no site configuration"):
        launcher.approve_or_refuse(build_fab())


def test_supernode_runs_process_isolation_with_the_site_launcher(tmp_path):
    from client.node import launcher_command, supernode_command
    from common.config import load_site_config

    cfg = load_site_config(_site(tmp_path, []))
    cmd = supernode_command(cfg)
    assert cmd[1:4] == ["-m", "client.launcher", "supernode"]  # Flower's SuperNode with the site's polling
    assert cmd[cmd.index("--isolation") + 1] == "process"
    secret = Path(cmd[cmd.index("--superexec-auth-secret-file") + 1])
    assert secret.stat().st_mode & 0o077 == 0
    lc = launcher_command(cfg, cmd, 123)
    assert lc[1:4] == ["-m", "client.launcher", "superexec"]
    assert lc[lc.index("--runtime-api-address") + 1] == f"127.0.0.1:{cmd[cmd.index('--port') + 1]}"
    shim = launcher.write_shim(tmp_path / "bin")
    assert shim.stat().st_mode & 0o100 and "clientapp_main()" in shim.read_text()


def test_review_shows_hash_verdict_changed_code_and_what_leaves(tmp_path):
    from client.review import render, review
    from common.config import load_site_config

    fab = build_fab()
    cfg = load_site_config(_site(tmp_path, []))
    exp = tmp_path / "experiment.yaml"
    exp.write_text("protocol: tenfold\nrounds: 3\nmodel:\n  trainable: head\n")
    text = "\n".join(render(review(cfg, fab, None, exp), cfg))
    assert bundle_hash(fab) in text and "not approved: " in text and "federation.approved_apps is empty" in text
    assert "changed: client/app.py" in text  # the stand-in app code is not the installed release
    assert "protocol tenfold, 3 round(s)" in text and "trainable head" in text
    assert "DP off: the coordinator sees this site's exact update" in text and "(not DP-protected)" in text
    assert f"to approve: add this line under `federation: approved_apps:` in {cfg.file}\n    - {bundle_hash(fab)}" in text
    approved = load_site_config(_site(tmp_path / "approved", [bundle_hash(fab)]))
    text = "\n".join(render(review(approved, fab), approved))
    assert "at this site: approved" in text and "to approve" not in text


def test_check_dry_run_verdicts_for_a_bundle(tmp_path):
    from client.node import bundle_verdicts
    from common.config import load_site_config

    fab = build_fab()
    (tmp_path / "app.fab").write_bytes(fab)
    (tmp_path / "other.fab").write_bytes(flip_one_byte(fab, "client/app.py"))
    cfg = load_site_config(_site(tmp_path, [bundle_hash(fab)]))
    ok = {v.what: v for v in bundle_verdicts(cfg, tmp_path / "app.fab")}
    assert ok["app bundle"].ok and not ok["app bundle"].warn and ok["installed release"].ok
    bad = {v.what: v for v in bundle_verdicts(cfg, tmp_path / "other.fab")}
    assert not bad["app bundle"].ok and "not approved" in bad["app bundle"].detail


def test_revoke_site_unregisters_the_node_and_marks_the_key(tmp_path, monkeypatch):
    from server import cli, flwrctl
    from server.coordinator import SiteRegistry

    registry = SiteRegistry(tmp_path / "sites.json")
    registry.add("hospital-a", 5, "k" * 64)
    registry.add("hospital-b", 6, "m" * 64)
    cfg = types.SimpleNamespace(registry_file=registry.file)
    calls = []
    monkeypatch.setattr(cli, "_config", lambda args: cfg)
    monkeypatch.setattr(cli, "_require_running", lambda c: {})
    monkeypatch.setattr(flwrctl, "flwr", lambda *a, **k: calls.append([str(x) for x in a]) or "{}")
    assert cli.main(["revoke-site", "hospital-a"]) == 0
    assert calls == [["supernode", "unregister", "5", "coordinator", "--format", "json"]]
    assert "revoked_at" in registry.load()["hospital-a"] and set(registry.active()) == {"hospital-b"}
    assert cli.main(["revoke-site", "hospital-a"]) == 2  # already revoked: one clear line, no second call
    assert len(calls) == 1
    with pytest.raises(Exception, match="was revoked"):
        registry.check_new("hospital-c", "k" * 64)  # the revoked key cannot come back under another name
    registry.check_new("hospital-a", "n" * 64)  # the site may return with a new key
    registry.add("hospital-a", 9, "n" * 64)
    assert registry.load()["hospital-a"]["revoked"][0]["node_id"] == 5


def test_renew_cert_keeps_sans_extends_expiry_and_changes_key(tmp_path):

    from cryptography import x509

    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "deploy" / "make_certs.sh"), str(certs), "coord.example.org", "10.0.0.5",
                    "--days", "2"], check=True, capture_output=True)  # fmt: skip
    old = x509.load_pem_x509_certificate((certs / "front.crt").read_bytes())
    old_key = (certs / "front.key").read_bytes()
    out = subprocess.run(["bash", str(REPO / "deploy" / "renew_cert.sh"), str(certs), "--days", "400", "--reload",
                          str(tmp_path / "state")], check=True, capture_output=True, text=True)  # fmt: skip
    new = x509.load_pem_x509_certificate((certs / "front.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    san = x509.SubjectAlternativeName

    def names(cert):
        ext = cert.extensions.get_extension_for_class(san).value
        return sorted(map(str, ext.get_values_for_type(x509.DNSName) + ext.get_values_for_type(x509.IPAddress)))

    assert names(new) == names(old) == ["10.0.0.5", "127.0.0.1", "coord.example.org", "localhost"]
    assert new.subject == old.subject and new.issuer == ca.subject
    new.verify_directly_issued_by(ca)
    days = (new.not_valid_after_utc - new.not_valid_before_utc).days
    assert 399 <= days <= 400 and new.not_valid_after_utc > old.not_valid_after_utc
    assert (certs / "front.key").read_bytes() != old_key and (certs / "front.key").stat().st_mode & 0o077 == 0
    assert "front not running" in out.stdout and len(list(certs.glob("front.crt.*.old"))) == 1



class CensusGrid:
    """Stand-in for the ServerApp's grid: each node answers the census through `answer(msg)` (None: no reply)."""

    def __init__(self, answers: dict):
        self.answers, self.asked = answers, []

    def get_node_ids(self):
        return list(self.answers)

    def send_and_receive(self, messages, *, timeout=None):
        self.asked += [(m.metadata.dst_node_id, m.metadata.message_type, timeout) for m in messages]
        return [r for r in (self.answers[m.metadata.dst_node_id](m) for m in messages) if r is not None]


def test_dry_run_readiness_asks_each_site_once_and_reports_one_row_per_site(tmp_path, task_identity):
    from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

    from server import readiness

    fab = build_fab()
    refusal = ""
    try:
        check_bundle(fab, [], version=VERSION, run_id=4)
    except NotApproved as exc:  # what Flower sends when the site's launcher refuses (run_clientapp's wrapping)
        refusal = f"<class 'client.approval.NotApproved'>:<'{exc}'>"

    def census(site, n, version=VERSION):
        return lambda m: Message(RecordDict({"metrics": MetricRecord({"num-examples": n, "n-malignant": 1}),
                                             "site": ConfigRecord({"site": site, "version": version})}),
                                 reply_to=m)  # fmt: skip

    def error(reason):
        return lambda m: Message(Error(code=0, reason=reason), reply_to=m)

    grid = CensusGrid({1: census("hospA", 12), 2: error(refusal), 3: lambda m: None,
                       4: error("<class 'client.tasks.SiteRefusal'>:<'the site has no usable patients (nothing "
                                "prepared)'>"), 5: census("hospF", 9, version="0.2.0")})  # fmt: skip
    request = readiness.write_request(tmp_path / "readiness", expected=5, deadline_s=7)
    assert readiness.is_request(request) and not readiness.is_request(tmp_path / "missing.yaml")
    result = readiness.run_readiness(grid, request, tmp_path / "readiness")
    assert [(node, kind, t) for node, kind, t in grid.asked] == [(n, "query", 7.0) for n in (1, 2, 3, 4, 5)]
    assert json.loads((tmp_path / "readiness" / readiness.RESULT).read_text()) == result

    registry = {"hospA": 1, "hospB": 2, "hospC": 3, "hospD": 4, "hospE": 6, "hospF": 5}
    states = {name: "offline" if name == "hospE" else "online" for name in registry}
    rows = {name: readiness.site_row(name, states[name], node, result, VERSION) for name, node in registry.items()}
    assert rows["hospA"]["ready"] and rows["hospA"]["data"] == "12 patient(s) (1 malignant)"
    assert (rows["hospB"]["bundle"], rows["hospB"]["ready"]) == ("REFUSED", False)
    assert rows["hospB"]["detail"] == refusal.split(":<'", 1)[1][:-2]  # the whole reason, Flower's wrapping removed
    assert rows["hospB"]["detail"].endswith("in its site.yaml") and bundle_hash(fab) in rows["hospB"]["detail"]
    assert rows["hospC"]["detail"].startswith("no reply within 7 s")
    assert (rows["hospD"]["bundle"], rows["hospD"]["data"]) == ("approved", "NOT usable")
    assert rows["hospE"]["detail"] == "not connected (offline)" and not rows["hospE"]["connected"]
    assert rows["hospF"]["release"] == "DIFFERS (0.2.0)" and not rows["hospF"]["ready"]
    assert "did not complete" in readiness.site_row("hospA", "online", 1, None, VERSION)["detail"]
    text = "\n".join(readiness.render(list(rows.values())))
    assert "hospB" in text and "REFUSED" in text and str(tmp_path) not in text
