"""`simulate run`: the ServerApp and ClientApp under Flower's simulation engine, driven exactly as a user would.

Path chosen: `flwr run` against a SuperLink in simulation mode that this command starts itself, on a free loopback
port, with a project-owned FLWR_HOME inside the output folder. Why not the alternatives in Flower 1.42:
- `flwr.simulation.run_simulation` is deprecated and cannot pass a run config to the apps (the ClientApp needs one to
  find each virtual node's site), so the apps would run differently from deployment;
- the `:local:` connection starts a detached SuperLink on fixed ports (39091/39093) shared by every user of the
  machine — with several people on one host a second run would attach to someone else's SuperLink.
This path builds and ships the real FAB (code only, see pyproject [tool.flwr.app]), runs the ServerApp in the
SuperLink's subprocess and the ClientApps on Ray, so what is tested is what deployment runs.

Process hygiene: runtime dependency installation, telemetry and update checks are off; Ray gets `num_cpus=1` per
virtual site. Every process started here carries a marker in its environment; at the end the SuperLink's process
group is stopped and any process still carrying the marker (Ray workers, flwr-simulation) is ended by id.

Accuracy vs ε (`--dp-epsilon 1,3,8`): after the main run, one more run per budget of the tenfold plan only
(`dp_experiment`), every virtual site with DP through a config written beside its site.yaml
(`site-dp-eps<E>.yaml`, ledger under out/dp/eps-<E>/ledgers, removed first: fresh per setting); ε = ∞ is the main run
when it trained exactly that plan's model, else one more run without DP. Results in results.json `dp_sweep`.

Site mapping: `out/sites.json` lists the sites' site.yaml paths; the run config key `sim-sites` points at it and the
ClientApp picks entry `partition-id` (see client/tasks.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from common.errors import SpineFedError
from server.experiment import ExperimentConfig
from server.flwrctl import (
    COMPLETED,
    flwr_env,
    follow_run,
    free_port,
    show_rounds,
    start_run,
    stop,
    wait_healthy,
)
from server.flwrctl import flwr as _flwr_cli
from server.protocol_registry import selectable

REPO = Path(__file__).resolve().parent.parent
CONNECTION = "spinefed-sim"


def _env(home: Path, marker: str) -> dict:
    return flwr_env(home, marker)


def _flwr(*argv, env, timeout=120) -> str:
    return _flwr_cli(*argv, env=env, cwd=REPO, timeout=timeout)


# Quick: a smoke test of the whole path (all protocols, baselines, final model, report) on a reduced plan that still
# shows learning: 10 small virtual sites, 3 folds, 3 held-out sites, 2 rounds of 3 local epochs at 64 px with
# layer4+head exchanged, over a stand-in backbone pretrained first on a small synthetic public cohort (QUICK_PUBLIC,
# never the sites' patients), as a user would start from ImageNet weights. FULL: the ten sites, tenfold, every
# held-out site, 10 rounds at 128 px (the full protocol's wall time: see README / the closing note).
QUICK = {
    "protocol": "all",
    "rounds": 2,
    "local_epochs": 3,
    "lr": 1e-3,
    "evaluate": "none",
    "folds": {"k": 3, "seed": 0},
    "plan": {"max_folds": 3, "max_held_out": 3, "local_only": True, "final_model": True},
    "min_cell": 5,
    "model": {"arch": "resnet50", "trainable": "layer4+head", "image_size": 64},
    "train": {"batch_size": 8, "augment": False},
}
FULL = {
    **QUICK,
    "rounds": 10,
    "local_epochs": 1,
    "folds": {"k": 10, "seed": 0},
    "plan": {"local_only": True, "final_model": True},
    "model": {"arch": "resnet50", "trainable": "layer4+head", "image_size": 128},
}
QUICK_DATA = {"n_sites": 10, "n_patients": 100}  # --small phantoms (64 px stacks), 10 patients a site
QUICK_PUBLIC = {"n_sites": 3, "n_patients": 150}  # --small public cohort for the quick stand-in backbone
QUICK_PRETRAIN = {"image_size": 64, "epochs": 10, "batch_size": 16, "lr": 1e-3, "seed": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, help="folder of virtual sites (<site>/site.yaml); --quick without it generates OUT/data"
    )
    parser.add_argument("--protocol", choices=selectable(), help="override the plan's")
    parser.add_argument("--no-centralized", action="store_true", help="skip the centralized baseline")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/simulation"), help="output folder (replaced unless --resume)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test of the whole path on small synthetic sites (generated into OUT/data, with a stand-in backbone "
        "pretrained on a small synthetic public cohort into OUT; both cached for later quick runs)",
    )
    parser.add_argument("--experiment", type=Path, help="experiment.yaml (default: built-in plan)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--pretrained", type=Path, help="stand-in backbone from `simulate pretrain` (model.pretrained)")
    parser.add_argument("--sites", type=int, help="use only the first N sites")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    parser.add_argument("--parallel", type=int, default=2, help="virtual sites training at once (CPUs for Ray)")
    parser.add_argument("--bench-noop", action="store_true", help=argparse.SUPPRESS)  # bench: load/return only
    parser.add_argument(
        "--dp-epsilon",
        type=_budgets,
        default=(),
        metavar="E1,E2,...",
        help="also run the tenfold plan with DP at every site, one run per per-site budget ε (fresh ledgers each), "
        "and add accuracy vs ε (ε = ∞ reference) to the report",
    )


def _budgets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (0 < v < float("inf")) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive finite budgets, got {text!r}")
    return values


def _sites(data: Path, limit: int | None) -> list[Path]:
    found = sorted(p.resolve() for p in Path(data).glob("*/site.yaml"))
    if not found:
        raise SpineFedError(f"{data}: no <site>/site.yaml found; run `simulate data --out {data}` first")
    found = found[:limit] if limit else found
    from common.config import load_site_config

    todo = [p for p in found if _needs_prepare(load_site_config(p))]

    def prepare(path: Path) -> subprocess.CompletedProcess:  # exactly as a site would: its own `client prepare`
        print(f"  preparing {path.parent.name} (client prepare)", flush=True)
        cmd = [sys.executable, "-m", "client.cli", "prepare", "--config", str(path), "--workers", "1"]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)

    # Two sites at a time, one worker each: most of a small site's preparation is the command's start-up.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for path, done in zip(todo, pool.map(prepare, todo)):
            if done.returncode != 0:
                raise SpineFedError(f"`client prepare --config {path}` failed: {_last_line(done)}")
    return found


def _needs_prepare(cfg) -> bool:
    """No cache yet, or one prepared before the acquisition columns existed (#24) from data that is still there:
    `client prepare` adds them (a warm rerun rebuilds only what changed); without them every stratified result of the
    run would read 'unknown'. A cache whose manifest is gone (a cache handed over on its own) is used as it is."""
    from common.acquisition import COLUMNS

    index = cfg.cache / "index.csv"
    if not index.is_file():
        return True
    with index.open(encoding="utf-8") as fh:
        header = fh.readline().strip().split(",")
    return not set(COLUMNS) <= set(header) and cfg.manifest.is_file()


def _last_line(done: subprocess.CompletedProcess) -> str:
    """A child command's own one-line reason: its last non-empty output line (stderr first; progress bars skipped)."""
    for text in (done.stderr or "", done.stdout or ""):
        lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
        if lines:
            return lines[-1][:500]
    return f"exit code {done.returncode}, no output"


def _experiment(args, n_sites: int) -> dict:
    data = yaml.safe_load(args.experiment.read_text()) if args.experiment else dict(QUICK if args.quick else FULL)
    if getattr(args, "protocol", None):
        data["protocol"] = args.protocol
    if args.rounds:
        data["rounds"] = args.rounds
    if getattr(args, "pretrained", None):
        data["model"] = {**data.get("model", {}), "pretrained": str(args.pretrained.resolve())}
    # Virtual sites never disconnect: wait for all of them, with a bound all the same.
    data.setdefault("quorum", {"min_sites": n_sites, "join_timeout_s": 120, "round_timeout_s": args.timeout})
    ExperimentConfig.from_dict(data, args.experiment or "<simulate run>")  # validate before starting anything
    return data


def run(args: argparse.Namespace) -> int:
    """Run the simulation; exit code 0 only when the run's final status is finished:completed."""
    t0 = time.monotonic()
    out = args.out.resolve()
    if args.data is None:
        if not args.quick:
            raise SpineFedError("--data is required (or use --quick, which generates small virtual sites)")
        args.data = _quick_cohort(out / "data", public=False, **QUICK_DATA)
    sites = _sites(args.data, args.sites)
    if args.quick and not args.pretrained and not args.experiment:
        args.pretrained = _quick_backbone(out)
    experiment = _experiment(args, len(sites))
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:  # a fresh run replaces the previous one in --out (its checkpoint included)
        for stale in ("rounds.csv", "rounds.jsonl", "federation.json", "final_arrays.npz", "simulation.json"):
            (out / stale).unlink(missing_ok=True)
        for stale in ("results.json", "report.md", "report.html", "model.pt", "model.json", "model_card.md"):
            (out / stale).unlink(missing_ok=True)
        for folder in ("checkpoint", "protocol", "units", "centralized", "dp", "tensorboard"):
            shutil.rmtree(out / folder, ignore_errors=True)
    print(
        f"simulate run: {len(sites)} virtual sites, {experiment['rounds']} rounds{' (quick smoke test)' if args.quick else ''}"
    )
    print("  data are synthetic (phantom); figures here are not clinical evidence", flush=True)
    if not experiment.get("model", {}).get("pretrained"):
        print("  no pretrained weights: from scratch (use --pretrained from `simulate pretrain`)", flush=True)
    sim = _simulate(args, out, experiment, sites, t0 + args.timeout, resume=args.resume)
    run_id, status, late, marker = sim["run_id"], sim["status"], sim["stopped_late"], sim["marker"]
    ok = status == "finished:completed"
    if ok and (out / "results.json").is_file():
        _add_simulation_baselines(args, out, experiment, sites)
        if getattr(args, "dp_epsilon", ()):
            _dp_sweep(args, out, experiment, sites, t0 + args.timeout)
    seconds = time.monotonic() - t0
    summary = {"run_id": run_id, "status": status, "seconds": round(seconds, 1), "quick": bool(args.quick)}
    summary.update({"sites": [str(p) for p in sites], "stopped_late": late, "synthetic": True, "marker": marker})
    (out / "simulation.json").write_text(json.dumps(summary, indent=1))
    _print_improvement(out / "federation.json")
    _print_headline(out / "results.json")
    where = out / "report.md" if (out / "report.md").is_file() else out / "rounds.csv"
    print(f"simulate run: {status} in {seconds:.0f} s; see {where}")
    if late:
        print(f"  note: {len(late)} process(es) of this run outlived the SuperLink and were ended: {late}")
    return 0 if ok else 1


def _print_improvement(path: Path) -> None:
    """The final model against the starting one on the same patients (federation.json `improvement`), when scored."""
    gain = json.loads(path.read_text()).get("improvement") if path.is_file() else None
    if gain:
        auc, n = gain["pooled_auc"], gain["n"]["final"]
        print(
            f"  {gain['subset']} patients ({n}): pooled AUC {auc['initial']:.3f} (initial model) → {auc['final']:.3f} "
            f"after round {gain['round']}",
            flush=True,
        )


def _print_headline(path: Path) -> None:
    """The report's headline in the terminal: federated tenfold AUC and the calls at the validated threshold."""
    try:
        ten = json.loads(path.read_text())["protocols"]["tenfold"]["pooled"]
        auc, sens, spec = ten["auc"], ten["sensitivity"], ten["specificity"]
        print(
            f"  federated tenfold (synthetic data): AUC {auc['value']:.3f} (95% CI {auc['lo']:.3f}–{auc['hi']:.3f}, "
            f"{auc.get('method', 'see report')}); sensitivity {sens['k']}/{sens['n']}, specificity "
            f"{spec['k']}/{spec['n']} at the threshold from inner-validation data",
            flush=True,
        )
    except (OSError, ValueError, KeyError, TypeError):  # no tenfold in this run, or no results: the report says why
        pass


def _simulate(args, out: Path, experiment: dict, sites: list[Path], deadline: float, resume: bool = False) -> dict:
    """One `flwr run` of the apps on a private simulation SuperLink in `out`; → {run_id, status, stopped_late, marker}.

    Writes out/experiment.yaml and out/sites.json (the site.yaml of each virtual node); every process started is
    ended before returning (see the module docstring).
    """
    (out / "experiment.yaml").write_text(yaml.safe_dump(experiment, sort_keys=False))
    (out / "sites.json").write_text(json.dumps([str(p) for p in sites], indent=1))
    home, port, marker = out / ".flwr_home", free_port(), uuid.uuid4().hex
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = _env(home, marker)
    superlink, status, run_id = None, "not started", None
    try:
        cmd = [str(Path(sys.executable).parent / "flower-superlink"), "--insecure", "--simulation"]
        cmd += ["--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--disable-runtime-dependency-installation", "--log-file", str(out / "superlink.log")]
        superlink = subprocess.Popen(
            cmd, env=env, cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_healthy(port, superlink)
        run_cfg = {
            "experiment": str(out / "experiment.yaml"),
            "out-dir": str(out),
            "sim-sites": str(out / "sites.json"),
        }
        run_cfg.update(synthetic=True, quick=bool(args.quick), resume=bool(resume))
        run_cfg.update({"expected-sites": len(sites), "bench-noop": bool(getattr(args, "bench_noop", False))})
        fed = [f"num-supernodes={len(sites)}", "client-resources-num-cpus=1", "client-resources-num-gpus=0.0"]
        fed += [f"init-args-num-cpus={max(1, args.parallel)}", 'backend="ray"']
        run_id = start_run(REPO, CONNECTION, run_cfg, env, ["--federation-config", " ".join(fed)])
        print(f"  run {run_id} started (SuperLink 127.0.0.1:{port}, logs: {out / 'superlink.log'})", flush=True)
        status, _ = _follow(run_id, env, out, deadline)
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        if run_id:
            with contextlib.suppress(SpineFedError, subprocess.TimeoutExpired):
                (out / "run.log").write_text(_flwr("log", str(run_id), CONNECTION, env=env, timeout=60))
        late = stop(superlink, marker)
    return {"run_id": run_id, "status": status, "stopped_late": late, "marker": marker}


SWEEP_MAX_SIGMA = 100.0


def dp_experiment(experiment: dict) -> dict:
    """The accuracy-vs-ε plan: the experiment's tenfold folds only (no site-held-out, local-only or final model), with
    a model DP can train: BatchNorm frozen needs a partial trainable subset, so `all` with BatchNorm becomes
    `layer4+head` (GroupNorm models keep `all`)."""
    data = json.loads(json.dumps(experiment))
    data["protocol"] = "tenfold"
    data["plan"] = {**data.get("plan", {}), "local_only": False, "final_model": False, "max_held_out": 0}
    model = dict(data.get("model", {}))
    if model.get("norm", "batch") == "batch" and model.get("trainable", "all") == "all":
        model["trainable"] = "layer4+head"
    data["model"] = model
    return data


def dp_site_config(site_yaml: Path, budget: float, ledger: Path) -> Path:
    """A DP copy of a virtual site's config, written beside it (same folder: its relative paths still resolve):
    `privacy: {dp: true, epsilon_budget: budget, ledger: <fresh path>, ledger_record: beside it}`, everything else as
    the site's. The sweep measures what the noise does, so one experiment may spend the whole budget and any σ up to
    SWEEP_MAX_SIGMA is accepted; results.json says which settings the default site policy would refuse."""
    raw = yaml.safe_load(site_yaml.read_text()) or {}
    raw["privacy"] = {
        **(raw.get("privacy") or {}),
        "dp": True,
        "epsilon_budget": budget,
        "max_epsilon_per_experiment": budget,
        "max_noise_multiplier": SWEEP_MAX_SIGMA,
        "ledger": str(ledger),
        "ledger_record": str(ledger.with_name(ledger.stem + "-record.json")),
    }
    path = site_yaml.with_name(f"site-dp-eps{budget:g}.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sweep_noise(ledgers: Path, budget: float, delta: float = 1e-5) -> dict:
    """The noise each virtual site planned in a sweep run (read from its ledger: simulation only) and whether a site
    with the default policy (EXPERIMENT_SHARE of the budget per experiment, σ <= MAX_NOISE_MULTIPLIER) would have
    trained this plan at all: {"sigma": {site: σ}, "default_policy": {site: "trains at σ = …" | "refuses: …"}}."""
    from common.config import EXPERIMENT_SHARE, MAX_NOISE_MULTIPLIER
    from common.privacy import PrivacyBudgetExceeded, plan_noise

    sigma, policy = {}, {}
    for path in sorted(ledgers.glob("*.json")):
        if path.stem.endswith("-record"):
            continue
        with contextlib.suppress(OSError, ValueError, KeyError):
            plans = list(json.loads(path.read_text())["plans"].values())
            if not plans:
                continue
            plan = plans[0]
            sigma[path.stem] = float(plan["sigma"])
            try:
                needed = plan_noise(EXPERIMENT_SHARE * budget, delta, float(plan["q"]), int(plan["planned_steps"]))
            except PrivacyBudgetExceeded:
                needed = math.inf
            policy[path.stem] = (
                f"trains at σ = {needed:.3g}"
                if needed <= MAX_NOISE_MULTIPLIER
                else f"refuses: needs σ = {needed:.3g} > {MAX_NOISE_MULTIPLIER:g}"
            )
    return {"sigma": sigma, "default_policy": policy}


def _dp_sweep(args, out: Path, experiment: dict, sites: list[Path], deadline: float) -> None:
    """`--dp-epsilon`: one tenfold run per budget, every site with DP and a fresh ledger; accuracy vs ε (ε = ∞: the
    same plan without DP, taken from the main run when it trained exactly that) into results.json and the report."""
    from common.fileio import atomic_write_json
    from server.aggregates import dp_sweep_entry
    from server.report import render

    results = json.loads((out / "results.json").read_text())
    plan = dp_experiment(experiment)
    folder = out / "dp"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    settings = []
    if "tenfold" in results.get("protocols", {}) and plan["model"] == experiment.get("model"):
        settings.append(dp_sweep_entry(math.inf, results, "main run (no DP)"))
    else:
        print("  DP sweep: reference run without DP (ε = ∞)", flush=True)
        ref = folder / "eps-inf"
        ref.mkdir()
        sim = _simulate(args, ref, plan, sites, deadline)
        res = json.loads((ref / "results.json").read_text()) if (ref / "results.json").is_file() else None
        settings.append(dp_sweep_entry(math.inf, res, sim["status"]))
    for budget in args.dp_epsilon:
        run_dir = folder / f"eps-{budget:g}"
        (run_dir / "ledgers").mkdir(parents=True)
        dp_sites = [dp_site_config(p, budget, run_dir / "ledgers" / f"{p.parent.name}.json") for p in sites]
        print(f"  DP sweep: ε = {budget:g} per site (fresh ledgers in {run_dir / 'ledgers'})", flush=True)
        sim = _simulate(args, run_dir, plan, dp_sites, deadline)
        res = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else None
        entry = dp_sweep_entry(budget, res, sim["status"])
        entry["folder"] = str(run_dir.relative_to(out))
        entry.update(sweep_noise(run_dir / "ledgers", budget))
        settings.append(entry)
        spent = ", ".join(f"{s} {e:.3g}" for s, e in sorted(entry["epsilon_spent"].items())) or "none"
        print(f"    {sim['status']}; ε spent per site: {spent}", flush=True)
    model = plan["model"]
    results["dp_sweep"] = {
        "protocol": f"tenfold ({plan.get('plan', {}).get('max_folds') or plan['folds']['k']} fold(s) run)",
        "trainable": model.get("trainable", "all"),
        "norm": model.get("norm", "batch"),
        "delta": 1e-5,
        "settings": settings,
    }
    atomic_write_json(out / "results.json", results)
    render(results, out)


def _follow(run_id, env, out: Path, deadline: float) -> tuple[str, int]:
    """Follow the run (server/flwrctl.follow_run) and show rounds from rounds.csv as they complete."""
    shown, units_shown = 0, set()

    def tick() -> None:
        nonlocal shown
        shown = show_rounds(out / "rounds.csv", shown)
        progress = out / "protocol" / "progress.json"
        if progress.is_file():
            with contextlib.suppress(ValueError, OSError):
                for name, info in json.loads(progress.read_text())["units"].items():
                    if name not in units_shown:
                        units_shown.add(name)
                        thr = info.get("threshold")
                        thr = f"{thr:.3f}" if isinstance(thr, (int, float)) else thr  # 0.573, not 0.5730000000000001
                        print(f"  {name} done ({info.get('seconds', 0):.0f} s, threshold {thr})", flush=True)

    def done() -> bool:
        return (out / "federation.json").exists() or (out / "results.json").exists()

    status, details = follow_run(run_id, CONNECTION, env, deadline, on_tick=tick, done_hint=done)
    if status.startswith("finished") and status != COMPLETED and details:
        print(f"  run failed: {details}", flush=True)
    return status, shown


def _quick_cohort(folder: Path, public: bool, n_sites: int, n_patients: int) -> Path:
    """--quick: small synthetic sites (or the public cohort) in `folder`, generated once and reused by later quick
    runs. Reused only when complete (simulations.datagen.completed) and of the same plan; anything else in `folder`
    (an interrupted run's leftovers, another plan) is removed first, with one line saying so: the folder belongs to
    the quick run."""
    from simulations.datagen import completed, generate

    meta = completed(folder, public)
    if meta and meta.get("requested") == {"n_sites": n_sites, "n_patients": n_patients} and meta.get("small"):
        return folder
    if folder.exists():
        why = "from another plan" if meta else "incomplete (an earlier run was interrupted)"
        print(f"  {folder} is {why}: generating it again", flush=True)
        shutil.rmtree(folder)
    kind = "the small public cohort" if public else f"{n_sites} small virtual sites"
    print(f"  generating {kind} ({n_patients} patients, synthetic) into {folder}", flush=True)
    generate(folder, n_sites=n_sites, n_patients=n_patients, small_=True, public=public, seed=0, workers=2)
    return folder


def _quick_backbone(out: Path) -> Path:
    """--quick without --pretrained: the stand-in backbone, pretrained on a small synthetic public cohort (never the
    sites' patients) exactly as `simulate pretrain` does, cached as OUT/standin_r50_64.pt for later quick runs.

    Why: from scratch, ResNet50 cannot learn 2 classes from ~70 patients in a few rounds (the quick report was at
    chance), and a real user starts from pretrained (ImageNet) weights anyway; ImageNet cannot be downloaded here."""
    from simulations.pretrain import completed_weights

    weights = out / f"standin_r50_{QUICK_PRETRAIN['image_size']}.pt"
    meta = completed_weights(weights)
    if meta and {k: meta.get("train_config", {}).get(k) for k in QUICK_PRETRAIN} == QUICK_PRETRAIN:
        print(f"  stand-in backbone: {weights} (cached; synthetic public cohort, not ImageNet)", flush=True)
        return weights
    public = _quick_cohort(out / "public", public=True, **QUICK_PUBLIC)
    from common.model import ModelConfig
    from common.training import TrainConfig
    from simulations.centralized import discover_sites, open_sites
    from simulations.pretrain import pretrain
    from simulations.train_cli import step_bar

    t0 = time.monotonic()
    caches = [s.cache for s in open_sites(discover_sites(public))]
    size = QUICK_PRETRAIN["image_size"]
    print(f"  pretraining the stand-in backbone on the public cohort ({QUICK_PRETRAIN['epochs']} epochs)", flush=True)
    with step_bar("pretraining") as progress:
        pretrain(caches, weights, ModelConfig(image_size=size), TrainConfig(**QUICK_PRETRAIN), progress=progress)
    meta = completed_weights(weights) or {}
    auc = meta.get("result", {}).get("inner_val_auc")
    auc_text = f", inner-validation AUC {auc:.3f} on held-back public patients" if auc is not None else ""
    print(f"    done in {time.monotonic() - t0:.0f} s{auc_text}", flush=True)
    return weights


def _add_simulation_baselines(args, out: Path, experiment: dict, sites: list[Path]) -> None:
    """Simulation only (all data on this machine): the centralized tenfold reference over the same folds, the paired
    federated-vs-centralized contrast (bootstrap over sites on per-patient scores read from the virtual sites' stores)
    and the measured cost of the minimum cell count; then results.json and the report are rewritten."""
    from common import metrics as M
    from common.config import load_site_config
    from common.evaluation import summarize
    from common.fileio import atomic_write_json
    from server.report import render

    results = json.loads((out / "results.json").read_text())
    if "tenfold" not in results.get("protocols", {}):
        return
    tag = results["provenance"]["evaluation_tag"] + "-tenfold"
    thresholds = {u: i["threshold"] for u, i in results["units"].items() if u.startswith("tenfold/")}
    fed = {}
    from client.evalstore import EvalStore, default_folder, threshold_of

    for path in sites:
        cfg = load_site_config(path)
        store = EvalStore(default_folder(cfg.cache))
        for key, e in store.load(tag).items():
            thr = threshold_of(e, thresholds)
            fed[(cfg.site, key)] = (e["label"], e["score"], thr)
    if fed:
        y = np.array([v[0] for v in fed.values()])
        s = np.array([v[1] for v in fed.values()])
        site = np.array([k[0] for k in fed])
        results["suppression"] = {**M.suppression_cost(y, s, site, min_count=results["min_cell"]), "measured": True}
    if not args.no_centralized:
        print("  centralized baseline over the same folds (simulation only)", flush=True)
        from common.model import ModelConfig
        from common.training import TrainConfig
        from simulations.centralized import run_centralized

        exp = results["experiment"]
        model_cfg = ModelConfig.from_dict(exp["model"])
        train = {k: v for k, v in exp["train"].items()}
        train_cfg = TrainConfig.from_dict({**train, "epochs": exp["rounds"] * exp["local_epochs"], "lr": exp["lr"]})
        train_cfg = TrainConfig.from_dict({**train_cfg.to_dict(), "image_size": model_cfg.image_size})
        k = exp["folds"]["k"] if exp["folds"]["k"] >= 2 else 10
        central = run_centralized(
            args.data, out / "centralized", model_cfg, train_cfg, folds=k, seed=exp["folds"]["seed"]
        )
        done_folds = {int(u.split("-")[-1]) for u in thresholds}
        oof = [r for r in central["out_of_fold"] if r["fold"] in done_folds]  # the same folds as the federation ran
        from common.evaluation import OutOfFold

        summary = summarize(OutOfFold.from_records(oof)) if oof else {}
        if summary:
            results["protocols"]["centralized"] = {
                "label": "centralized tenfold (pooled, simulation only)",
                "pooled": summary["pooled"],
                "per_site": summary["per_site"],
                "random_effects": summary.get("random_effects", {}),
            }
        pairs = [(r, fed.get((r["site"], r["key"]))) for r in oof]
        pairs = [(r, f) for r, f in pairs if f is not None]
        if pairs:
            y = np.array([r["label"] for r, _ in pairs])
            fs, cs = np.array([f[1] for _, f in pairs]), np.array([r["score"] for r, _ in pairs])
            fc = (fs >= np.array([f[2] for _, f in pairs])).astype(int)
            cc = (cs >= np.array([r["threshold"] for r, _ in pairs])).astype(int)
            st = np.array([r["site"] for r, _ in pairs])
            results["contrasts"]["federated_vs_centralized"] = {
                "a": "federated tenfold",
                "b": "centralized",
                "n": int(y.size),
                "bootstrap_auc": M.paired_bootstrap_over_sites(y, fs, cs, st),
                "bootstrap_accuracy": M.paired_bootstrap_over_sites(y, fc, cc, st, stat_fn=M.accuracy_stat),
                "mcnemar": M.mcnemar_paired(fc == y, cc == y),
            }
    atomic_write_json(out / "results.json", results)
    render(results, out)
