"""The coordinator's Flower ServerApp: read the run config, run the experiment's federated training.

Run config keys (defaults in pyproject.toml [tool.flwr.app.config]):
- `experiment`: path of experiment.yaml on the coordinator's machine;
- `out-dir`: folder for checkpoints, rounds.csv, federation.json;
- `resume`: continue from the checkpoint in out-dir (same experiment fingerprint);
- `expected-sites`: how many sites to wait for before each round (0: the quorum);
- `sim-sites`: simulation only, read by the ClientApp (see client/tasks.py);
- `bench-noop`: benchmark only: sites load and return the tensors without training (bench/federation_overhead.py);
- `synthetic`, `quick`: labels for the report (simulate run sets them: synthetic data, smoke-test plan).

Protocol `train` is one federated training (server/federation.py); `tenfold`, `site-held-out` and `all` run the
protocol runner (server/protocols.py), which writes results.json, report.md and report.html into out-dir. A readiness
request (`server run --dry-run` passes one as `experiment`) asks each site one census question and writes
readiness.json (server/readiness.py).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.experiment import load_experiment
from server.federation import run_training
from server.grid import PromptGrid
from server.protocols import run_protocol
from server.readiness import is_request, run_readiness

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    if not rc.get("experiment") or not rc.get("out-dir"):
        raise ValueError("run config needs 'experiment' (experiment.yaml) and 'out-dir'")
    grid = PromptGrid(grid)
    if is_request(str(rc["experiment"])):  # `server run --dry-run`: one census question, no training
        run_readiness(grid, str(rc["experiment"]), Path(str(rc["out-dir"])))
        return
    exp = load_experiment(str(rc["experiment"]))
    expected = int(rc.get("expected-sites", 0)) or None
    if exp.protocol != "train":
        run_protocol(
            grid,
            exp,
            Path(str(rc["out-dir"])),
            resume=bool(rc.get("resume", False)),
            expected_sites=expected,
            synthetic=bool(rc["synthetic"]) if "synthetic" in rc else None,
            quick=bool(rc.get("quick", False)),
            app_hash=_app_hash(grid),
        )
        return
    summary = run_training(
        grid,
        exp,
        Path(str(rc["out-dir"])),
        resume=bool(rc.get("resume", False)),
        expected_sites=expected,
        noop=bool(rc.get("bench-noop", False)),
    )
    if summary["rounds"] and len(summary["all_failed_rounds"]) == len(summary["rounds"]):
        # Flower would report this run as completed; it trained nothing.
        raise RuntimeError("every round failed at every site: the model was not trained")


def _app_hash(grid: Grid) -> str | None:
    """The FAB hash of this run (provenance), where the grid knows it."""
    try:
        return str(grid.run.fab_hash) or None
    except (AttributeError, TypeError):  # a grid without run information (tests, a run not set): no hash to record
        return None
