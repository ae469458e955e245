"""The fixed reply schema shared by the ClientApp and the ServerApp (they never import each other).

Flower kills the ServerApp when the replies of one round differ in keys (`InconsistentMessageReplies`), so every site
sends exactly these metric keys, DP or not, share_predictions or not. Values a site does not have are sent as −1.
"""

from __future__ import annotations

ARRAYS = "arrays"  # ArrayRecord: the exchanged (trainable) tensors
CONFIG = "config"  # ConfigRecord of an instruction
METRICS = "metrics"  # MetricRecord of a reply
SITE = "site"  # ConfigRecord of a census reply: {"site": name, "cache-hash": sha256, "version": installed spinefed}
PREDICTIONS = "predictions"  # ConfigRecord of an evaluate reply, only when the site shares per-key scores
REPORT = "report"  # ConfigRecord of a report query reply: {"report": JSON of client.tasks.report's aggregates}
# ConfigRecord of secure summation (common/securesum.py): {"public-key": bytes} on a membership reply; {"masked": bytes,
# "min-cell": int} or {"refused": text} on an evaluation reply or a `securesum` query's mask step; {"seed": bytes} on
# its reveal step; {"hist": [float]} on its clear fallback. Never a MetricRecord: Flower would average those as floats.
SECURESUM = "securesum"

# Evaluate-on-receipt: a TRAIN instruction whose CONFIG holds EVALUATE_FIRST (JSON of an evaluate instruction's
# config) asks the site to score the tensors it just received before training on them. The reply then also carries
# a MetricRecord EVALUATION (EVALUATE_KEYS) and, at sites that share scores, PREDICTIONS: one message per site and
# round instead of two, for the model that the coordinator would otherwise send again in an evaluate message.
EVALUATE_FIRST = "evaluate-first"
EVALUATION = "evaluation"

# QUERY instructions carry a ConfigRecord CONFIG with `action`: "census" (default; counts, site name, cache hash),
# "membership" (with k, fold-seed, val-fraction, seed: the class counts of every unit's parts, MetricRecord MEMBERSHIP)
# or "report" (the protocol run's one cumulative report, `requests` = JSON, see client/tasks.report).
# Instruction keys: the ConfigRecord CONFIG of a train or evaluate message (server/federation.round_configs,
# server/protocols.py) and the value a site assumes where one is absent (client/app.py). Also sent: experiment-id and
# planned-rounds (DP), lr, model and train (JSON), noop (benchmarks), securesum (a summation's spec, JSON) and
# evaluate-first (JSON of an evaluation to run before training). A QUERY's CONFIG has `action` (ACTIONS below) and
# its own keys: run (membership), requests (report, JSON), request (securesum, JSON).
INSTRUCTION_DEFAULTS = {
    "server-round": 0,
    "fedbn": 0,
    "proximal-mu": 0.0,
    "k": 0,
    "fold-seed": 0,
    "held-out": -1,
    "seed": 0,
    "subset": "all",
    "tag": "default",
    "report": 0,
    "min-cell": 5,
    "threshold": -1.0,
    "epochs": 1,
    "validation": 0,
    "unit": "",
    "transfer-dtype": "float32",
}
ACTIONS = ("census", "membership", "report", "securesum")
MEMBERSHIP = "membership"
# Per fold f (lists of length k): held-out fold, inner-train and inner-validation class counts of the model that
# holds f out; all-pos / all-neg: [inner-train, validation, total] of a model trained on every labelled patient.
MEMBERSHIP_KEYS = frozenset(
    {"fold-pos", "fold-neg", "train-pos", "train-neg", "val-pos", "val-neg", "all-pos", "all-neg"}
)

NUM_EXAMPLES = "num-examples"

TRAIN_KEYS = frozenset(
    {
        NUM_EXAMPLES,  # training patients (the FedAvg weight)
        "train-loss",  # mean loss of the last epoch
        "steps",  # optimizer steps
        "val-examples",  # inner validation patients (scored at evaluation, for the threshold histograms)
        "dp",  # 1 when the update was trained with differential privacy
        "epsilon",  # ε spent by the site so far (−1 when DP is off)
        "delta",  # the δ of that ε, the site's own (−1 when DP is off)
        "seconds",  # wall time of the local work
    }
)

EVALUATE_KEYS = frozenset(
    {
        NUM_EXAMPLES,  # patients scored in this message
        "stored",  # scores kept in the site's evaluation store under this tag
        "reported",  # 1 when the aggregate fields below describe the store, 0 when they are placeholders
        "n-pos",
        "n-neg",
        "auc",  # the site's own AUC over the stored scores (−1 when undefined)
        "auc-var",  # its DeLong variance (−1 when undefined)
        "tp",
        "fp",
        "tn",
        "fn",
        "hist-pos",  # malignant score histogram, minimum cell count applied at the site
        "hist-neg",  # benign score histogram, likewise
        "shared",  # 1 when per-key scores are attached (PREDICTIONS record)
        "seconds",
        "val-examples",  # inner-validation patients scored (0 unless asked: `validation` 1)
        "val-hist-pos",  # their malignant score histogram (minimum cell count applied): the threshold is chosen here
        "val-hist-neg",
    }
)

# and the acquisition mix: "acq-min-cell" and one "acq/<attribute>/<level>" count per level present at the site
# (common/acquisition.census_counts)
QUERY_KEYS = frozenset({NUM_EXAMPLES, "n-benign", "n-malignant", "n-unlabelled", "acq-min-cell"})
