"""One real federated round through the deployment path, timed: process start, transfer, compute.

Starts the real coordinator (`server`: SuperLink + nginx TLS front) and three `client --site` SuperNodes on
127.0.0.1 (tiny synthetic sites from tests/tinysites.py: synthetic data, not clinical), then for each trainable subset
runs a one-round experiment with `server run` (no evaluation message) and splits its wall time:
- process start: coordinator up, and all sites connected (once, shared by the subsets);
- run overhead: `server run` wall minus the round (flwr run: FAB build/upload, ServerApp start, census);
- round wall (rounds.csv `seconds`): sending the model, ClientApp process start at each site, local training,
  sending the update back, aggregation;
- compute: the sites' own wall time of local training (reply metric `seconds`; max over sites);
- transfer + ClientApp start = round wall − compute (max); payload = the train reply's size from the audit log.
Figures are printed and written as JSON (--out); never asserted.

Usage: python bench/round_latency.py [--arch resnet50] [--size 32] [--subsets all layer4+head head]
       [--transfer-dtype float16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.deployhelpers import Deployment  # noqa: E402
from tests.tinysites import TINY_MODEL, TINY_TRAIN  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=32, help="image size (px) of the tiny sites")
    parser.add_argument("--subsets", nargs="+", default=["all", "layer4+head", "head"])
    parser.add_argument(
        "--transfer-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="what travels (float16 halves the payload; aggregation stays float32)",
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    results: dict = {
        "arch": args.arch,
        "size": args.size,
        "sites": 3,
        "synthetic": True,
        "transfer_dtype": args.transfer_dtype,
        "subsets": {},
    }
    with tempfile.TemporaryDirectory(prefix="round_latency-") as tmp:
        dep = Deployment(Path(tmp), uuid.uuid4().hex[:12])
        try:
            t0 = time.monotonic()
            dep.start_server()
            results["coordinator_start_s"] = round(time.monotonic() - t0, 2)
            names = ("siteA", "siteB", "siteC")
            for i, name in enumerate(names):
                dep.add_site(name, n=12, seed=i)
            t1 = time.monotonic()
            for name in names:
                dep.start_site(name)
            dep.wait_online(names, timeout=180)
            results["sites_connect_s"] = round(time.monotonic() - t1, 2)
            print(f"coordinator up in {results['coordinator_start_s']} s; 3 sites connected in "
                  f"{results['sites_connect_s']} s", flush=True)  # fmt: skip
            for subset in args.subsets:
                model = {**TINY_MODEL, "arch": args.arch, "image_size": args.size, "trainable": subset}
                exp = dep.experiment(f"lat-{subset.replace('+', '-')}", rounds=1, evaluate="none", model=model,
                                     transfer_dtype=args.transfer_dtype,
                                     train=TINY_TRAIN, quorum={"min_sites": 3, "join_timeout_s": 60,
                                                               "round_timeout_s": 600})  # fmt: skip
                out = dep.coord_dir / "runs" / exp.stem
                t2 = time.monotonic()
                res = dep.server("run", exp, "--out", out, timeout=900)
                run_id = int(res.stdout.split("run ", 1)[1].split()[0])
                run_wall = time.monotonic() - t2
                rnd = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
                compute = [m.get("seconds", 0.0) for m in rnd["accepted"].values()]
                payload = max(
                    json.loads(line).get("size", 0)
                    for cfg in dep.sites.values()
                    for line in (cfg.parent / "audit.jsonl").read_text().splitlines()
                    if json.loads(line).get("kind") == "train" and json.loads(line).get("run") == run_id
                )
                row = {
                    "run_wall_s": round(run_wall, 2),
                    "round_wall_s": round(rnd["seconds"], 2),
                    "run_overhead_s": round(run_wall - rnd["seconds"], 2),
                    "compute_max_s": round(max(compute), 2),
                    "transfer_and_clientapp_start_s": round(rnd["seconds"] - max(compute), 2),
                    "payload_mb": round(payload / 1e6, 2),
                    "sites_ok": len(rnd["accepted"]),
                }
                results["subsets"][subset] = row
                print(f"{subset:12s} " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        finally:
            late = dep.close()
            if late:
                print(f"note: ended {len(late)} late process(es)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
