"""The privacy ledger fails closed (issue #17, item 3): a missing, emptied, replaced or rolled-back ledger, or a
deleted record, is refused; an interrupted write is accepted and repaired; ledger and record restored together are
accepted (undetectable by design: back both up together). Real files throughout; no model is trained."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.config import load_site_config
from common.errors import ConfigError
from common.privacy import FORMAT, RECOVERY, LedgerError, PrivacyLedger, epsilon_of
from tests.tinysites import make_site

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
SIGMA, Q = 1.5, 0.25


def new_ledger(root: Path, name: str = "ledger.json") -> PrivacyLedger:
    """Ledger and record in separate folders, as at a site (the record beside the pseudonym secret)."""
    return PrivacyLedger(root / "privacy" / name, record=root / "keys" / f"secret-{name}.record")


def charged(root: Path, n: int = 1, name: str = "ledger.json") -> PrivacyLedger:
    ledger = new_ledger(root, name)
    for i in range(n):
        ledger.charge(SIGMA, Q, 4, f"round {i}")
    return ledger


def refused(ledger: PrivacyLedger, reason: str, caplog) -> LedgerError:
    """Every way of using the ledger is refused with `reason`; the message names no path, the site's log does."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="common.privacy"), pytest.raises(LedgerError) as err:
        ledger.epsilon(DELTA)
    assert err.value.reason == reason, err.value
    msg = str(err.value)
    assert str(ledger.path.parent.parent) not in msg and ledger.path.name not in msg
    assert "restores the ledger and its record" in msg
    logged = caplog.text
    assert str(ledger.path) in logged and str(ledger.record) in logged and RECOVERY in logged
    before = [p.read_bytes() if p.exists() else None for p in (ledger.path, ledger.record)]
    for use in (
        lambda: ledger.charge(SIGMA, Q, 1, "x"),
        lambda: ledger.reserve(SIGMA, Q, 1, "x", budget=100.0, delta=DELTA, experiment=None),
        lambda: ledger.plan("exp", Q, 4, 100.0, DELTA, experiment_epsilon=50.0, max_noise_multiplier=100.0),
        ledger.history,
    ):
        with pytest.raises(LedgerError):
            use()
    assert [p.read_bytes() if p.exists() else None for p in (ledger.path, ledger.record)] == before
    status = ledger.status()
    assert status.state == "refused" and status.reason == reason
    return err.value


def test_fresh_site_creates_ledger_and_record_with_a_chain(tmp_path):
    ledger = new_ledger(tmp_path)
    assert ledger.status().state == "fresh" and ledger.epsilon(DELTA) == 0.0
    assert not ledger.path.exists() and not ledger.record.exists()  # reading creates nothing
    ledger.charge(SIGMA, Q, 4, "round 0")
    led, rec = json.loads(ledger.path.read_text()), json.loads(ledger.record.read_text())
    assert led["format"] == FORMAT == "spinefed-privacy-ledger/2"
    assert set(rec) == {"format", "ledger_id", "charges", "changes", "chain", "updated"}
    assert led["ledger_id"] == rec["ledger_id"] and len(led["ledger_id"]) == 32
    assert (led["charges"], led["changes"], led["chain"]) == (rec["charges"], rec["changes"], rec["chain"])
    assert (led["charges"], led["changes"]) == (1, 2)  # creation, then the charge
    assert led["last_change"]["kind"] == "charge" and led["prev_chain"] != led["chain"]
    assert oct(ledger.record.stat().st_mode & 0o777) == "0o600"
    status = ledger.status()
    assert (status.state, status.charges, status.ledger_id) == ("ok", 1, led["ledger_id"])


def test_deleted_ledger_is_refused(tmp_path, caplog):
    ledger = charged(tmp_path, 2)
    ledger.path.unlink()
    refused(ledger, "missing", caplog)
    shutil.rmtree(ledger.path.parent)  # the whole ledger folder gone (e.g. a moved disk)
    refused(ledger, "missing", caplog)


@pytest.mark.parametrize(
    "content",
    [
        "{}",
        json.dumps({"format": FORMAT, "entries": [], "purposes": {}, "plans": {}, "charges": 0}),
        json.dumps({"format": "spinefed-privacy-ledger/1", "entries": [], "purposes": {}, "plans": {}}),
    ],
    ids=["empty-object", "empty-format-2", "empty-format-1"],
)
def test_emptied_ledger_is_refused(tmp_path, caplog, content):
    ledger = charged(tmp_path, 2)
    ledger.path.write_text(content)
    err = refused(ledger, "old-format" if "/1" in content else "emptied", caplog)
    assert "2 charge(s)" in str(err) or "old format" in str(err)


def test_ledger_replaced_by_another_is_refused(tmp_path, caplog):
    ledger = charged(tmp_path, 3)
    other = charged(tmp_path / "elsewhere", 1)  # a valid ledger of its own, with fewer charges
    shutil.copy(other.path, ledger.path)
    refused(ledger, "replaced", caplog)


def test_rolled_back_ledger_is_refused(tmp_path, caplog):
    ledger = charged(tmp_path, 1)
    backup = tmp_path / "copy-after-charge-1.json"
    shutil.copy(ledger.path, backup)
    ledger.charge(SIGMA, Q, 4, "round 1")
    ledger.charge(SIGMA, Q, 4, "round 2")
    shutil.copy(backup, ledger.path)  # the ledger alone restored from an earlier copy
    err = refused(ledger, "rolled-back", caplog)
    assert "1 charge(s)" in str(err) and "3" in str(err)
    # Rolled back by a single change (the last charge) is refused too.
    ledger2 = charged(tmp_path / "two", 1)
    one = ledger2.path.read_bytes()
    ledger2.charge(SIGMA, Q, 4, "round 1")
    ledger2.path.write_bytes(one)
    refused(ledger2, "rolled-back", caplog)


def test_deleted_record_is_refused(tmp_path, caplog):
    ledger = charged(tmp_path, 2)
    ledger.record.unlink()
    err = refused(ledger, "record-missing", caplog)
    assert "2 charge(s)" in str(err)


def test_record_restored_alone_is_refused(tmp_path, caplog):
    ledger = charged(tmp_path, 1)
    old_record = ledger.record.read_bytes()
    ledger.charge(SIGMA, Q, 4, "round 1")
    ledger.charge(SIGMA, Q, 4, "round 2")
    ledger.record.write_bytes(old_record)  # two changes behind: not an interrupted write
    refused(ledger, "rolled-back", caplog)


def test_hand_edited_ledger_is_refused(tmp_path, caplog):
    ledger = charged(tmp_path, 3)
    led = json.loads(ledger.path.read_text())
    led["entries"][0]["steps"] = 1  # "only one step was ever taken"
    ledger.path.write_text(json.dumps(led))
    refused(ledger, "edited", caplog)


def test_crash_between_ledger_and_record_writes_is_accepted_and_repaired(tmp_path):
    ledger = charged(tmp_path, 1)
    record_after_1 = ledger.record.read_bytes()
    ledger.charge(SIGMA, Q, 4, "round 1")
    ledger.record.write_bytes(record_after_1)  # what a kill between the two writes of charge 2 leaves
    led = json.loads(ledger.path.read_text())
    assert led["prev_chain"] == json.loads(record_after_1)["chain"]
    # Accepted (the ledger is one change ahead: it can only over-count) and the record repaired.
    assert ledger.history()[0].steps == 8
    rec = json.loads(ledger.record.read_text())
    assert (rec["chain"], rec["charges"]) == (led["chain"], 2)
    ledger.charge(SIGMA, Q, 4, "round 2")
    assert ledger.status().state == "ok" and ledger.status().charges == 3


def _killed_before_record_write(ledger: PrivacyLedger, nth: int) -> int:
    """Run a charge in another process that dies (os._exit) right before its `nth` write of the record."""
    code = f"""
        import os
        from pathlib import Path
        from common.privacy import PrivacyLedger
        record = Path({str(ledger.record)!r})
        real, seen = os.replace, [0]
        def replace(src, dst):
            if Path(dst) == record:
                seen[0] += 1
                if seen[0] == {nth}:
                    os._exit(7)
            real(src, dst)
        os.replace = replace
        PrivacyLedger({str(ledger.path)!r}, record=record).charge({SIGMA!r}, {Q!r}, 4, "killed round")
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, timeout=120).returncode


def test_process_killed_between_the_two_writes(tmp_path):
    # At creation: the new ledger holds only its creation, no record yet: accepted, the record written from it.
    fresh = new_ledger(tmp_path / "fresh")
    assert _killed_before_record_write(fresh, 1) == 7
    assert fresh.path.exists() and not fresh.record.exists()
    assert fresh.status().state == "ok" and fresh.record.exists() and fresh.epsilon(DELTA) == 0.0
    # Later: the charge reached the ledger, not the record: accepted, counted, repaired.
    ledger = charged(tmp_path, 1)
    assert _killed_before_record_write(ledger, 1) == 7
    assert ledger.history()[0].steps == 8
    assert json.loads(ledger.record.read_text())["charges"] == 2
    assert not list(tmp_path.rglob("*.tmp"))


def test_ledger_and_record_restored_together_are_accepted(tmp_path):
    """Undetectable by design (DESIGN: back both up together after every experiment, restore both together)."""
    ledger = charged(tmp_path, 1)
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy(ledger.path, backup / "ledger.json")
    shutil.copy(ledger.record, backup / "record.json")
    eps_1 = ledger.epsilon(DELTA)
    ledger.charge(SIGMA, Q, 4, "round 1")
    shutil.copy(backup / "ledger.json", ledger.path)
    shutil.copy(backup / "record.json", ledger.record)
    assert ledger.status().state == "ok" and ledger.epsilon(DELTA) == eps_1
    ledger.charge(SIGMA, Q, 4, "round 1 again")  # and the site carries on from the backup
    # Both deleted together: a fresh site (also undetectable; SITE_IT.md says so).
    ledger.path.unlink()
    ledger.record.unlink()
    assert ledger.status().state == "fresh"


def test_format_1_ledger_is_migrated_without_a_record_and_refused_with_one(tmp_path, caplog):
    ledger = new_ledger(tmp_path)
    ledger.path.parent.mkdir(parents=True)
    v1 = {"format": "spinefed-privacy-ledger/1", "entries": [{"sigma": SIGMA, "q": Q, "steps": 12}], "charges": 3}
    v1.update(purposes={"old": {"charges": 3, "steps": 12}}, plans={})
    ledger.path.write_text(json.dumps(v1))
    assert ledger.status().state == "unverified"  # an upgrading site: read as it is
    assert ledger.epsilon(DELTA) == pytest.approx(epsilon_of([(SIGMA, Q, 12)], DELTA))
    ledger.charge(SIGMA, Q, 4, "after the upgrade")  # migrated: format 2, with a record
    assert json.loads(ledger.path.read_text())["format"] == FORMAT and ledger.record.exists()
    assert ledger.history()[0].steps == 16 and ledger.status().charges == 4
    # The old file put back over the migrated ledger: refused.
    ledger.path.write_text(json.dumps(v1))
    refused(ledger, "old-format", caplog)


def test_no_record_configured_reads_but_never_writes(tmp_path):
    ledger = charged(tmp_path, 1)
    bare = PrivacyLedger(ledger.path)  # inspection only (e.g. tests, tools)
    assert bare.history() == ledger.history() and bare.status().state == "unverified"
    with pytest.raises(LedgerError) as err:
        bare.charge(SIGMA, Q, 1, "x")
    assert err.value.reason == "no-record"
    with pytest.raises(LedgerError):
        PrivacyLedger(ledger.path, record=ledger.path)


def _site(tmp_path: Path, **privacy) -> Path:
    return make_site(tmp_path, "hospA", n=6, privacy={"dp": True, **privacy})


def test_ledger_lives_outside_the_cache_and_survives_a_re_prepared_or_moved_cache(tmp_path):
    var = tmp_path / "var" / "spinefed"
    # Inside the cache: refused at load (re-preparing the cache would lose it); with DP, no ledger path: refused.
    with pytest.raises(ConfigError, match="inside the cache"):
        load_site_config(_site(tmp_path, ledger=tmp_path / "hospA" / "cache" / "ledger.json"))
    with pytest.raises(ConfigError, match="privacy.ledger"):
        load_site_config(_site(tmp_path))
    cfg = load_site_config(_site(tmp_path, ledger=var / "ledger.json"))
    assert cfg.privacy.ledger_record.parent == cfg.secret.parent  # beside the pseudonym secret, not the ledger
    ledger = PrivacyLedger(cfg.privacy.ledger, record=cfg.privacy.ledger_record)
    ledger.charge(SIGMA, Q, 4, "round 0")
    before = ledger.path.read_bytes(), ledger.record.read_bytes()
    # Re-prepare: the cache deleted and written again.
    shutil.rmtree(cfg.cache)
    cfg2 = load_site_config(_site(tmp_path, ledger=var / "ledger.json"))
    # Moved: the cache renamed and the config pointed at its new place.
    cfg.cache.rename(tmp_path / "hospA" / "cache-moved")
    text = cfg2.file.read_text().replace("cache: cache", "cache: cache-moved")
    cfg2.file.write_text(text)
    cfg3 = load_site_config(cfg2.file)
    assert cfg3.cache.name == "cache-moved"
    for c in (cfg2, cfg3):
        again = PrivacyLedger(c.privacy.ledger, record=c.privacy.ledger_record)
        assert again.status().state == "ok" and again.history() == ledger.history()
    assert (ledger.path.read_bytes(), ledger.record.read_bytes()) == before


def test_client_check_reports_the_ledger(tmp_path):
    from client.cli import privacy_verdicts

    cfg = load_site_config(_site(tmp_path, ledger=tmp_path / "var" / "ledger.json", epsilon_budget=4))
    lines = [v.line() for v in privacy_verdicts(cfg)]
    assert lines[0].startswith("OK") and "fresh" in lines[0] and str(cfg.privacy.ledger) in lines[0]
    assert "ε spent 0" in lines[1] and "budget ε 4" in lines[1] and "per-experiment cap ε 2" in lines[1]
    assert "max noise multiplier σ 10" in lines[1] and "min_cell 5" in lines[1] and "δ = 1e-05" in lines[1]
    ledger = PrivacyLedger(cfg.privacy.ledger, record=cfg.privacy.ledger_record)
    ledger.charge(SIGMA, Q, 4, "round 0")
    ledger.charge(SIGMA, Q, 4, "round 1")
    lines = [v.line() for v in privacy_verdicts(cfg)]
    assert lines[0].startswith("OK") and "ok: 2 charge(s)" in lines[0] and str(cfg.privacy.ledger_record) in lines[0]
    assert f"ε spent {epsilon_of([(SIGMA, Q, 8)], DELTA):.4g} (RDP" in lines[1]
    ledger.path.unlink()
    verdicts = privacy_verdicts(cfg)
    assert not verdicts[0].ok and not verdicts[1].ok
    line = verdicts[0].line()
    assert line.startswith("FAIL") and "REFUSED (missing)" in line and RECOVERY in line
    assert str(cfg.privacy.ledger) in line and str(cfg.privacy.ledger_record) in line and "never delete" in line
    off = load_site_config(make_site(tmp_path / "off", "hospB", n=6))
    (line,) = [v.line() for v in privacy_verdicts(off)]
    assert line.startswith("OK") and "differential privacy off" in line
