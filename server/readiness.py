"""`server run --dry-run`: what the coordinator can check before an experiment, and the package the sites review.

From the coordinator's side only connection state is visible (the SuperLink's node list). Whether a site approved the
app bundle, runs the same release and has prepared data is known only at the site: the dry run therefore builds the
exact bundle `flwr run` will send (Flower's deterministic builder, same hash) and writes it with the experiment into a
review folder to send to the sites, who check it with `client check --dry-run --fab app.fab` and `client review`.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


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
