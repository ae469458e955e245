"""`client review` states the threat model, what DP does not cover, and this site's own privacy limits.

Cheap: a two-patient site, a bundle built in memory (tests/test_governance.py), nothing trained or started.
"""

from __future__ import annotations

from client.review import render, review
from common.config import load_site_config
from tests.fakes import build_fab
from tests.tinysites import make_site

OUTSIDE_DP = (
    "outside DP (sent as exact values, with or without DP):",
    "evaluation outputs: per-tag counts, TP/FP/TN/FN, this site's AUC and DeLong variance, Brier sum",
    "paired-comparison summaries, reader McNemar counts",
    "census n-benign / n-malignant / n-unlabelled, num-examples and val-examples of every unit",
    "per-fold class counts",
    "inner-validation score histograms from which the coordinator sets the decision threshold",
    "into secure sums over >= 3 sites, else cells of at least",
    "the malignant-class loss weight",
    "the site's patient count (it sets DP's sampling rate)",
    "per-patient scores by pseudonym key",
)


def _text(cfg) -> str:
    return "\n".join(render(review(cfg, build_fab()), cfg))


def test_review_states_threat_model_outside_dp_list_and_site_limits(tmp_path):
    ledger = tmp_path / "privacy" / "ledger.json"  # outside the cache, as config requires
    privacy = {"dp": True, "ledger": ledger, "min_cell": 7, "max_noise_multiplier": 6.5, "epsilon_budget": 3}
    privacy |= {
        "max_epsilon_per_experiment": 1.5,
        "class_weight": 2,
        "delta": "0.000001",
    }  # YAML reads 1e-6 as a string
    cfg = load_site_config(make_site(tmp_path, "hospital-a", n=2, n_malignant=1, privacy=privacy))
    text = _text(cfg)
    threat = text[text.index("threat model:") : text.index("outside DP")]
    assert "DP protects each patient against anyone who reads the released model weights" in " ".join(threat.split())
    assert "It does NOT protect against the coordinator's evaluation queries" in threat
    assert "without noise" in threat
    assert 3 <= len(threat.strip().splitlines()) - 1 <= 6  # the statement itself: 3 to 6 lines
    for item in OUTSIDE_DP:
        assert item in text, item
    # the site's own limits, with the values it set
    assert "min_cell 7: every histogram cell sent in the clear, or published from a secure sum" in text
    assert "histograms (into secure sums over >= 3 sites, else cells of at least 7)" in text
    assert "max_noise_multiplier 6.5: a task that needs more noise is refused" in text
    assert "epsilon_budget 3 over the site's lifetime, at most ε 1.5 per experiment" in text and "delta 1e-06" in text
    assert "class_weight 2: the malignant-class loss weight under DP, a public constant" in text
    assert "privacy.class_weight 2 (declared public)" in text
    assert f"ledger {ledger}" in text and f"ledger_record {cfg.privacy.ledger_record}" in text
    assert "per-patient scores by pseudonym key: no (share_predictions: false)" in text


def test_review_without_dp_says_updates_are_unprotected_and_shows_defaults(tmp_path):
    cfg = load_site_config(make_site(tmp_path, "hospital-b", n=2, n_malignant=1, share_predictions=True))
    text = _text(cfg)
    assert "dp: false: no differential privacy at this site" in text
    assert "DP is off here, so the model updates are not protected either" in text
    assert "It does NOT protect against the coordinator's evaluation queries" in text
    assert (
        "min_cell 5: every histogram cell sent in the clear, or published from a secure sum" in text
    )  # the default floor
    assert "per-patient scores by pseudonym key: YES (share_predictions: true)" in text
    for item in OUTSIDE_DP:
        assert item in text, item
