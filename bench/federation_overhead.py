"""Federation overhead: what a simulated round costs beyond the sites' own work, and what it ships.

Three measurements, printed and written to OUT/overhead.json (never asserted in tests):
1. Payload: bytes of the exchanged tensors per site per round (down + up) for each trainable subset (ResNet50).
2. Real rounds (`simulate run` machinery, every round evaluated): each round's wall time against the ideal
   = (sum of the sites' own train + eval seconds) / sites running in parallel. Goal: ratio <= 1.15. Each model is
   scored on receipt by the next round's training messages (round 1 scores the starting model; the last round also
   sends evaluate messages), so a round's ideal counts the evaluations its messages ran; also printed for all rounds.
3. Fixed part: the same federation where the sites only load and return the tensors (`--bench-noop`: the ClientApp
   builds the model, loads the global tensors and sends them back), i.e. a plain Flower app's round over the same
   tensors; compared with (2)'s wall minus ideal.

Stated workload (issue 5): `python bench/federation_overhead.py --data DIR --image-size 128 --trainable layer4+head`
over the ten prepared virtual sites (one local epoch over each site's data). Data are synthetic.
fp16 transfer (payload in float16 vs float32, and its effect on AUC): bench/fp16_transfer.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulations import run as sim  # noqa: E402


def payload_bytes(arch: str = "resnet50") -> dict[str, int]:
    import torch

    from common.model import ModelConfig, build_model, get_exchange_arrays

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch))
    return {t: sum(a.nbytes for a in get_exchange_arrays(model, t).values()) for t in ("all", "layer4+head", "head")}


def _simulate(args, out: Path, plan: dict, noop: bool) -> list[dict]:
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(plan))
    parser = argparse.ArgumentParser()
    sim.add_arguments(parser)
    argv = ["--data", str(args.data), "--out", str(out), "--experiment", str(out.parent / f"{out.name}.yaml")]
    argv += ["--parallel", str(args.parallel)] + (["--sites", str(args.sites)] if args.sites else [])
    sargs = parser.parse_args(argv)
    sargs.bench_noop = noop
    if sim.run(sargs) != 0:
        raise SystemExit(f"simulation failed; see {out}")
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="prepared virtual sites (<site>/site.yaml)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-overhead"))
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--trainable", default="layer4+head", choices=("all", "layer4+head", "head"))
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--rounds", type=int, default=3, help="the last one also runs the final evaluate messages")
    p.add_argument("--sites", type=int, help="only the first N sites")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--transfer-dtype", default="float32", choices=("float32", "float16"), help="what travels")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    sizes = payload_bytes(args.arch)
    model = {"arch": args.arch, "trainable": args.trainable, "image_size": args.image_size}
    plan = {"rounds": args.rounds, "local_epochs": 1, "evaluate": "every-round", "model": model}
    plan["transfer_dtype"] = args.transfer_dtype
    plan["train"] = {"batch_size": 8, "augment": False, "num_threads": 1}
    real = _simulate(args, args.out / "real", plan, noop=False)
    noop = _simulate(args, args.out / "noop", {**plan, "evaluate": "none"}, noop=True)

    # Evaluate-on-receipt (server/strategy.py): round r's training messages also score round r − 1's model (round 1:
    # the starting model), and the last round adds its own evaluate messages. A round's ideal counts the work its
    # messages did.
    fed = json.loads((args.out / "real" / "federation.json").read_text())
    scored = {0: fed.get("initial_evaluation", {}).get("evaluation", {})}
    scored |= {rec["round"]: rec["evaluation"] for rec in real}
    rows, last = [], real[-1]["round"]
    for rec in real:
        done = [rec["round"] - 1] + ([rec["round"]] if rec["round"] == last else [])
        own = sum(s["seconds"] for s in rec["accepted"].values())
        own += sum(s["seconds"] for k in done for s in scored.get(k, {}).values())
        ideal = own / min(args.parallel, max(1, len(rec["accepted"])))
        rows.append(
            {"round": rec["round"], "wall_s": rec["seconds"], "ideal_s": ideal, "ratio": rec["seconds"] / ideal}
        )
    total = sum(r["wall_s"] for r in rows) / sum(r["ideal_s"] for r in rows)
    fixed = [r["seconds"] for r in noop]
    result = {
        "workload": {**plan, "data": str(args.data), "parallel": args.parallel, "sites": len(real[0]["sent"])},
        "payload_bytes_per_site_round": {t: 2 * b for t, b in sizes.items()},
        "rounds": rows,
        "ratio_all_rounds": total,
        "noop_round_s": fixed,
        "synthetic": True,
    }
    (args.out / "overhead.json").write_text(json.dumps(result, indent=1))
    print(f"payload per site per round (down+up), {args.arch} fp32:")
    for t, b in sizes.items():
        print(f"  {t:<12} {2 * b / 1e6:10.3f} MB")
    print(
        f"rounds ({len(real[0]['sent'])} sites, {args.image_size} px, trainable {args.trainable}, {args.parallel} parallel):"
    )
    for r in rows:
        print(f"  round {r['round']}: wall {r['wall_s']:.1f} s, ideal {r['ideal_s']:.1f} s, ratio {r['ratio']:.2f}")
    print(f"  all rounds: wall / ideal {total:.2f}")
    print(f"load-and-return-only rounds (fixed part): {', '.join(f'{s:.1f} s' for s in fixed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
