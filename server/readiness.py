"""`server run --dry-run`: is every site ready for this experiment? Asked of the sites themselves, before it starts.

Whether a site approved the app bundle, runs the same release and has prepared data is known only at the site. The
dry run therefore submits a census-only run of the exact bundle `server run` will send (same sources, Flower's
deterministic builder, same hash): the ServerApp sees a readiness request instead of an experiment (`is_request`),
sends every connected site one census query with a deadline and writes the answers to `readiness.json`
(`run_readiness`). Each site's own launcher checks the bundle first, so:
- a site that refuses the bundle (not approved, other release) answers with an Error naming the hash and the reason;
- a site that runs it answers with its name, patient counts, its acquisition mix (patients per scanner attribute
  level, small cells suppressed at the site: shown under its row), cache hash and installed release (or an Error
  saying that its data are not usable);
- a site that does not answer within the deadline is "no reply"; one not connected is never asked.
The coordinator turns that into one row per registered site (`site_rows`). Nothing trains and nothing but the census
leaves a site; the sites record the run (`client review RUN`) and audit the reply like any other.

The same command writes the review package the sites need to approve the bundle (`review_package`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from common.acquisition import describe_mix

log = logging.getLogger("flwr.spinefed.readiness")  # child of flwr: shown in `flwr run --stream`
REQUEST = "readiness"  # top-level key of a readiness request (passed as the run config's `experiment`)
RESULT = "readiness.json"


def review_package(app_dir: Path, experiment: Path, out: Path) -> tuple[Path, str]:
    """Write out/app.fab, out/experiment.yaml and out/SHA256SUMS; returns (folder, bundle sha256)."""
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(app_dir)
    digest = hashlib.sha256(fab).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    (out / "app.fab").write_bytes(fab)
    shutil.copyfile(experiment, out / "experiment.yaml")
    exp_digest = hashlib.sha256((out / "experiment.yaml").read_bytes()).hexdigest()
    (out / "SHA256SUMS").write_text(f"{digest}  app.fab\n{exp_digest}  experiment.yaml\n")
    return out, digest


def app_version(app_dir: Path) -> str:
    """The release the bundle built from `app_dir` declares (its pyproject.toml): what each site's must equal."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: flwr depends on tomli
        import tomli as tomllib

    return str(tomllib.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"])


# --- coordinator CLI side: the request ----------------------------------------------------------------------------


def write_request(folder: Path, expected: int, deadline_s: float, join_s: float = 10.0) -> Path:
    """The readiness request the ServerApp reads in place of an experiment (JSON, which is YAML)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "request.yaml"
    path.write_text(json.dumps({REQUEST: {"expected": int(expected), "deadline_s": float(deadline_s),
                                          "join_s": float(join_s)}}))  # fmt: skip
    return path


def is_request(path: str | Path) -> bool:
    """Whether the run config's `experiment` file is a readiness request (never raises: the experiment loader
    reports a bad file properly)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # unreadable, not UTF-8, not YAML
        return False
    return isinstance(data, dict) and isinstance(data.get(REQUEST), dict)


# --- ServerApp side ------------------------------------------------------------------------------------------------


def run_readiness(grid, request_file: str | Path, out: Path) -> dict:
    """Ask every connected site one census question (bounded by the request's deadline); write out/readiness.json."""
    import yaml

    from server.federation import census_replies
    from server.quorum import QuorumNotReached, wait_for_nodes

    req = yaml.safe_load(Path(request_file).read_text(encoding="utf-8"))[REQUEST]
    deadline = float(req.get("deadline_s", 120.0))
    try:
        nodes = wait_for_nodes(grid, 1, float(req.get("join_s", 10.0)), wanted=int(req.get("expected", 0)) or None)
    except QuorumNotReached:
        nodes = []
    answers, refused = census_replies(grid, nodes, deadline) if nodes else ({}, {})
    result = {
        "deadline_s": deadline,
        "asked": [int(n) for n in nodes],
        "answers": {str(n): v for n, v in answers.items()},
        "refused": {str(n): r for n, r in refused.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT).write_text(json.dumps(result, indent=1, default=float))
    log.info("readiness: %d asked, %d answered, %d refused", len(nodes), len(answers), len(refused))
    return result


# --- coordinator CLI side: the table -------------------------------------------------------------------------------


def _reason(raw: str) -> str:
    """The site's own message from Flower's Error reason ("<class '…'>:<'message'>"), whole: a refusal says how to
    approve the bundle, and that part comes last."""
    text = re.sub(r"^<class '[\w.]+'>:<'", "", raw.strip())
    return text[:-2] if text.endswith("'>") else text


def site_row(name: str, state: str, node: int, result: dict | None, version: str) -> dict:
    """One site's readiness: connected, bundle, release, data, and `ready` (all four good).

    `state`: the SuperLink's node status; `result`: readiness.json (None when the readiness run did not complete);
    `version`: the bundle's release, which every site must run."""
    row = {"site": name, "connected": state == "online", "bundle": "-", "release": "-", "data": "-", "ready": False}
    key = str(node)
    if state != "online":
        return {**row, "detail": f"not connected ({state})"}
    if result is None:
        return {**row, "detail": "no answer: the readiness run did not complete (see its status above)"}
    if int(node) not in result.get("asked", []):
        return {**row, "detail": "not asked (it connected after the readiness question was sent)"}
    if key in result.get("refused", {}):
        raw = result["refused"][key]
        reason = _reason(raw)
        if "NotApproved" in raw:  # the site's launcher refused before any bundle code ran
            other = "versions must match" in reason
            return {**row, "bundle": "approved" if other else "REFUSED", "release": "DIFFERS" if other else "?",
                    "detail": reason}  # fmt: skip
        # The ClientApp ran (so the launcher approved the bundle and its release) and refused the census: data.
        return {**row, "bundle": "approved", "release": "same", "data": "NOT usable", "detail": reason}
    answer = result.get("answers", {}).get(key)
    if answer is None:
        return {**row, "detail": f"no reply within {result.get('deadline_s', 0):g} s (site launcher or ClientApp "
                "not running? see the site's SuperNode log)"}  # fmt: skip
    same = answer.get("version", version) == version
    n = int(answer.get("num-examples", 0))
    data = f"{n} patient(s) ({int(answer.get('n-malignant', 0))} malignant)" if n else "NONE usable"
    detail = "" if answer.get("site") == name else f"answered as site {answer.get('site')!r}"
    return {**row, "bundle": "approved", "release": "same" if same else f"DIFFERS ({answer.get('version')})",
            "data": data, "ready": same and n > 0 and not detail, "detail": detail,
            "scanners": describe_mix(answer)}  # fmt: skip


def render(rows: list[dict]) -> list[str]:
    """The per-site table for the terminal."""
    lines = [f"  {'site':20s} {'connected':10s} {'app bundle':11s} {'release':10s} data"]
    for r in rows:
        lines.append(f"  {r['site']:20s} {'yes' if r['connected'] else 'NO':10s} {r['bundle']:11s} {r['release']:10s} "
                     f"{r['data']}")  # fmt: skip
        if r.get("detail"):
            lines.append(f"  {'':20s} {r['detail']}")
        # the site's acquisition mix (patients per level, small cells suppressed at the site): the federation's
        # scanner park before anything trains
        if r.get("scanners"):
            lines.append(f"  {'':20s} scanners: {r['scanners']}")
    return lines
