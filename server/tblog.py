"""Per-round scalars for TensorBoard (`tensorboard --logdir OUT`), written beside rounds.csv when it is installed.

Optional: the `tensorboard` package (extra `spinefed[tensorboard]`) provides `torch.utils.tensorboard`. Without it
the run says so once and goes on; rounds.csv and rounds.jsonl carry the same figures. Step = federated round; the
initial model's evaluation (before round 1) is step 0, so the evaluation curves start where training started.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger("flwr.spinefed.tensorboard")  # child of flwr: shown in `flwr run --stream`

FOLDER = "tensorboard"


def _writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises this when the tensorboard package is missing
        log.info(
            "TensorBoard not installed (pip install 'spinefed[tensorboard]'): per-round scalars in rounds.csv only"
        )
        return None
    return SummaryWriter(log_dir=str(folder))


def _number(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):  # empty CSV cells ("" when a figure does not exist this round)
        return None
    return v if math.isfinite(v) else None


class RoundLog:
    """Writes one round's scalars at a time; every call is a no-op when TensorBoard is missing."""

    def __init__(self, out: str | Path):
        self.folder = Path(out) / FOLDER
        self.writer = _writer(self.folder)

    def _add(self, scalars: dict, step: int) -> None:
        if self.writer is None:
            return
        for tag, value in scalars.items():
            v = _number(value)
            if v is not None:
                self.writer.add_scalar(tag, v, step)
        self.writer.flush()  # live curves while the run goes on

    def evaluation(self, step: int, score: dict) -> None:
        """An evaluation round's scores (server.aggregates.evaluation_score): pooled AUC, Brier, each site's AUC."""
        scalars = {"eval/pooled_auc": score.get("pooled_auc"), "eval/brier": score.get("brier")}
        scalars["eval/examples"] = score.get("n")
        scalars.update({f"eval/auc/{site}": v for site, v in score.get("site_auc", {}).items()})
        self._add(scalars, step)

    def round(self, step: int, row: dict, accepted: dict[str, dict], bytes_per_site: int) -> None:
        """One round: `row` is its rounds.csv row, `accepted` the sites' train metrics, `bytes_per_site` the tensors
        one site receives (and sends back) on the wire."""
        scalars = {f"sites/{k[len('sites_') :]}": row[k] for k in row if k.startswith("sites_")}
        scalars.update({"round/seconds": row["seconds"], "round/all_failed": row["all_failed"]})
        scalars.update({"train/loss": row["train_loss"], "train/examples": row["num_examples"]})
        scalars.update({"train/epsilon_max": row["epsilon_max"], "transfer/mb_per_site_each_way": bytes_per_site / 1e6})
        scalars["transfer/mb_round_total"] = bytes_per_site * (int(row["sites_sent"]) + int(row["sites_ok"])) / 1e6
        for site, m in accepted.items():
            if float(m.get("train-loss", -1)) >= 0:  # DP sites withhold theirs (−1)
                scalars[f"train/loss/{site}"] = m["train-loss"]
            scalars[f"train/seconds/{site}"] = m.get("seconds")
        self._add(scalars, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
