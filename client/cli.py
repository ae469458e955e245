"""`client`: the hospital side.

client prepare --config site.yaml     DICOM + manifest → cache of 6-channel stacks, index.csv, QC page qc/index.html
client predict --model M ...          one patient: P(malignant), call, validated performance, Grad-CAM
client keygen --config site.yaml      make this site's key pair; prints the public key to send to the coordinator
client check --config site.yaml       config, data, key, certificate, reachability, approved apps, privacy ledger
                                      and budget: one verdict each
             [--dry-run --fab FILE]   ... and whether this app bundle would run here (approved, versions match)
client review RUN|--fab FILE --config site.yaml [--experiment FILE]
                                      what a run's app bundle will execute here and what will leave the site
client --site NAME --config site.yaml start this hospital's SuperNode (outbound HTTPS only; foreground; Ctrl-C stops)

--config goes before or after the subcommand's name (common/cli.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from client import predict
from common import umask
from common.cli import Command, CommandLine
from common.config import load_site_config
from common.errors import SpineFedError, run_command


def _progress_bar(file=None):
    """`prepare`'s progress callback and its closer: one bar per stage (scan, stacks), plain lines when not a tty."""
    from common.progress import progress_bar

    bars: dict = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            desc = {"scan": "scanning DICOM files", "stacks": "building stacks"}.get(stage, stage)
            unit = "file" if stage == "scan" else "patient"
            bar = bars[stage] = progress_bar(total=total or None, desc=desc, unit=unit, file=file)
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    def close():
        for bar in bars.values():
            bar.close()

    return update, close


def _fetch_progress(file=None):
    """The PACS fetch's progress callback and its closer: a bar over patients whose label carries the bytes."""
    from common.progress import progress_bar

    bar = None

    def update(done: int, total: int, nbytes: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(total=total, desc="fetching from PACS (0.0 MB)", unit="patient", file=file)
        bar.desc = f"fetching from PACS ({nbytes / 1e6:.1f} MB)"
        bar.update(done - bar.n)

    return update, lambda: bar is not None and bar.close()


def _fetch_from_pacs(config, pacs, rows, quiet: bool) -> dict[int, str]:
    """data.source dicomweb: bring data.store up to date; the rows whose fetch failed, with their reasons."""
    from client.pacs import fetch

    update, close = _fetch_progress() if not quiet else (None, lambda: None)
    try:
        summary = fetch(config, pacs, rows, progress=update)
    finally:
        close()
    print(f"PACS {config.dicomweb.url}: {summary.fetched} of {summary.rows} patient(s) complete in {config.dicomweb.store}"
          f"; {summary.new_instances} new instance(s) ({summary.new_bytes / 1e6:.1f} MB), {summary.unchanged} unchanged"
          + (f", {summary.removed} removed" if summary.removed else "")
          + (f"; {len(summary.failed)} not fetched (reasons in index.csv)" if summary.failed else ""))  # fmt: skip
    return summary.failed


def cmd_prepare(args: argparse.Namespace) -> int:
    from common.prepare import FILE_MAP, LogScrubber, prepare

    config = load_site_config(args.config)
    pacs = None
    if config.dicomweb is not None:  # one question to the PACS before anything is written (exit 2 if unusable)
        from client.pacs import connect

        pacs, rows = connect(config)
    log_file = config.cache.parent / f"{config.cache.name}-prepare.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    umask.tighten([log_file, config.cache])  # left group/world-readable by a run before the umask was set
    handler = logging.FileHandler(log_file, encoding="utf-8")
    # The kept log names DICOM files by pseudonym (folder names are often PatientIDs); common/prepare.py LogScrubber.
    handler.setFormatter(LogScrubber(config.for_prepare(), "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    skips = _fetch_from_pacs(config, pacs, rows, args.quiet) if pacs is not None else None
    update, close = _progress_bar() if not args.quiet else (None, lambda: None)
    try:
        summary = prepare(config.for_prepare(), progress=update, workers=args.workers, skips=skips)
    finally:
        close()
    print(f"site {config.site}: {summary.ok} ok ({summary.reused} unchanged, reused), {summary.skipped} skipped")
    print(f"  files: {summary.dicom_files} DICOM, {summary.non_dicom_files} non-DICOM ignored")
    if summary.non_image_files:
        kinds = ", ".join(k for k, _ in summary.non_image.most_common())
        print(f"  non-image DICOM ({kinds}) ignored: {summary.non_image_files}")
    if summary.duplicates:
        print(f"  {summary.duplicates} duplicate files ignored (same SOP Instance UID and pixel data)")
    print(
        f"  {summary.unreadable_files} unreadable image file(s) (listed in {log_file} by file pseudonym; "
        f"{config.cache / FILE_MAP} maps each pseudonym to its path)"
    )
    # The terminal may name the files (a person fixing them reads it now); the kept log does not.
    for path, why in summary.unreadable[:20]:
        print(f"  unreadable: {path}: {why}", file=sys.stderr)
    if len(summary.unreadable) > 20:
        print(f"  ... and {len(summary.unreadable) - 20} more (see {config.cache / FILE_MAP})", file=sys.stderr)
    for kind, n in summary.reasons().most_common():
        print(f"  skipped {n:4d}: {kind}")
    print(
        f"  cache: {config.cache} (index.csv lists every patient with its reason; QC page to sign off: qc/index.html)"
    )
    if summary.ok == 0:
        print("error: no usable patient; see the reasons above and in index.csv", file=sys.stderr)
        return 1
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from client.node import keygen

    config = load_site_config(args.config)
    path, public = keygen(config, force=args.force)
    print(f"private key: {path} (owner-only; never send it)")
    print(f"public key ({path}.pub), send it to the coordinator for `server register-site {config.site} KEY.pub`:")
    print(public)
    return 0


def privacy_verdicts(config) -> list:
    """`client check`'s privacy lines: the ledger's state (ok / fresh / refused, with the reason, both paths and the
    recovery: this runs at the site, paths are fine here), ε spent (RDP) at δ, the budget and the site's policy."""
    from client.node import Verdict
    from common.privacy import RECOVERY, PrivacyLedger, epsilon_of

    p = config.privacy
    policy = (
        f"budget ε {p.epsilon_budget:g} at δ = {p.delta:g}; per-experiment cap ε {p.experiment_epsilon:g}; "
        f"max noise multiplier σ {p.max_noise_multiplier:g}; min_cell {p.min_cell}"
    )
    if p.ledger is None:
        return [Verdict("privacy", True, f"differential privacy off (privacy.dp: false), no ledger; {policy}")]
    where = f"ledger {p.ledger}, record {p.ledger_record}"
    st = PrivacyLedger(p.ledger, record=p.ledger_record).status()
    if st.state == "refused":
        return [
            Verdict(
                "privacy ledger",
                False,
                f"REFUSED ({st.reason}): {st.message}. {where}. To recover: {RECOVERY}; never delete the ledger or "
                "its record to unblock training (that resets the site's budget)",
            ),
            Verdict("privacy budget", False, f"ε spent unknown (ledger refused); {policy}"),
        ]
    if st.state == "fresh":
        line = (
            f"fresh: no ledger and no record yet, nothing spent ({where}); the first DP round creates both. "
            "Back both up, with the pseudonym secret, after every experiment"
        )
    elif st.state == "unverified":  # a format-1 ledger not yet migrated (or no record configured: FAIL)
        line = f"unverified: {st.note} ({where})"
    else:
        line = f"ok: {st.charges} charge(s) in {st.changes} change(s), ledger id {st.ledger_id}, matches its record"
        line += f" ({where})" + (f"; {st.note}" if st.note else "")
    out = [Verdict("privacy ledger", st.state != "unverified" or p.ledger_record is not None, line)]
    spent = epsilon_of(st.history, p.delta)
    left = spent < p.epsilon_budget
    detail = f"ε spent {spent:.4g} (RDP, all {st.charges} charge(s)) of {policy}; DP " + ("on" if p.dp else "off")
    if not left:
        detail += "; budget spent: every DP training task is refused"
    out.append(Verdict("privacy budget", True, detail, warn=not left))
    return out


def cmd_check(args: argparse.Namespace) -> int:
    from client.node import bundle_verdicts, check

    config = load_site_config(args.config)
    verdicts = check(config)
    verdicts += privacy_verdicts(config)
    if args.dry_run or args.fab:
        verdicts += bundle_verdicts(config, args.fab)
    for verdict in verdicts:
        print(verdict.line())
    return 0 if all(v.ok for v in verdicts) else 1


def cmd_review(args: argparse.Namespace) -> int:
    from client.review import load_run, render, review

    config = load_site_config(args.config)
    run = None
    if args.fab:
        try:
            fab = args.fab.read_bytes()
        except OSError as exc:
            raise SpineFedError(f"{args.fab}: cannot read ({exc.strerror})") from None
    elif args.run is not None:
        fab, run = load_run(config, args.run)
    else:
        raise SpineFedError("name a run id (one that reached this site) or --fab FILE")
    for line in render(review(config, fab, run, args.experiment), config):
        print(line)
    return 0


def cmd_site(args: argparse.Namespace) -> int:
    import uuid

    from client.node import log_path, require_ready, run_supernode

    if not args.config:
        raise SpineFedError("--site needs --config site.yaml")
    config = load_site_config(args.config)
    if args.site != config.site:
        raise SpineFedError(f"--site {args.site} does not match {config.file} (site: {config.site})")
    require_ready(config)
    print(f"site {config.site}: SuperNode connecting to {config.federation.superlink}; log: {log_path(config)}; "
          "Ctrl-C stops it", flush=True)  # fmt: skip
    code = run_supernode(config, f"site-{config.site}-{uuid.uuid4().hex}")
    if code not in (0, -15, 143):
        print(f"error: the SuperNode exited with code {code}; see {log_path(config)}", file=sys.stderr)
        return 1
    print(f"site {config.site}: SuperNode stopped")
    return 0


def _prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None, help="processes (default: preprocess.workers or CPU cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _keygen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace an existing key (re-register it afterwards)")


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="also: would an experiment's app bundle run here?")
    p.add_argument("--fab", type=Path, help="the app bundle to check (from the coordinator, or `flwr build`)")


def _review_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", type=int, help="run id (see the refusal in the SuperNode log)")
    p.add_argument("--fab", type=Path, help="an app bundle file (.fab)")
    p.add_argument("--experiment", type=Path, help="the experiment.yaml the coordinator sent with it")


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="the site's site.yaml (keys: site, data.root, data.cache, ...)")


COMMANDS = [
    Command(
        "prepare",
        "turn the site's DICOM and manifest.csv into the cache of 6-channel stacks",
        _prepare_arguments,
        cmd_prepare,
        description="Scan data.root for DICOM (by content), build one 6-channel stack per manifest row, write "
        "index.csv and a QC page for a radiologist (qc/index.html, a picture per patient). Re-runs rebuild only what "
        "changed. Exit 1 when no patient is usable, 2 when the config or manifest cannot be used (the cache is then "
        "left untouched).",
        requires=("--config",),
    ),
    predict.COMMAND,
    Command(
        "keygen",
        "make this site's key pair (ECDSA P-384); prints the public key to send to the coordinator",
        _keygen_arguments,
        cmd_keygen,
        description="The private key stays here (federation.auth_private_key, default supernode.key beside "
        "site.yaml; owner-only). An existing key is kept and its public key printed again unless --force.",
        requires=("--config",),
    ),
    Command(
        "check",
        "check config, data, key, certificate, reachability, approved apps and the privacy ledger (one verdict "
        "line each)",
        _check_arguments,
        cmd_check,
        description="Exit 0 when nothing FAILs. The reachability check makes a TLS handshake with "
        "federation.superlink (through network.proxy, else HTTPS_PROXY, if set; it says which) and verifies it with "
        "federation.root_certificates. The "
        "privacy lines check the DP ledger against its record (ok / fresh / refused, with the recovery steps) and "
        "print ε spent, the budget and the site's privacy policy.",
        requires=("--config",),
    ),
    Command(
        "review",
        "what a run's app bundle will execute here and what will leave the site (before approving it)",
        _review_arguments,
        cmd_review,
        description="RUN: a run id that reached this site (the launcher records every run, approved or refused). "
        "Or --fab FILE: a bundle the coordinator sent. Prints the bundle's hash, whether it is approved here, which "
        "files differ from the installed release, the run or experiment settings, and what leaves the site.",
        requires=("--config",),
    ),
]


def _top(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site", help="this hospital's site name (as registered with the coordinator)")


def command_line() -> CommandLine:
    return CommandLine(
        "client",
        COMMANDS,
        _shared,
        top=_top,
        description="Hospital side of the federated spine-MRI fracture classifier. Patient data never leaves the site.",
    )


def main(argv: list[str] | None = None) -> int:
    # Owner-only by construction (cache, keys, logs, audit log, the SuperNode's state): common/umask.py.
    umask.owner_only()
    cli = command_line()
    args = cli.parse(argv)
    command = cli.run_of(args) or (cmd_site if args.site else None)
    if command is None:  # neither a subcommand nor --site: a usage error, so the help goes to stderr with exit 2
        cli.parser.print_help(sys.stderr)
        return 2
    return run_command(command, args, interrupted="interrupted; the cache holds only complete files")


if __name__ == "__main__":
    sys.exit(main())
