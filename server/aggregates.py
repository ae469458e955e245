"""Turn the sites' cumulative reports (client/tasks.report: counts, DeLong AUC + variance, suppressed histograms,
paired comparisons, reader McNemar counts) into protocol results with confidence intervals, at the coordinator.

Everything here works on aggregates only; per-patient scores appear nowhere. Headline AUC: the per-site AUCs pooled
by a random-effects meta-analysis (common.metrics.meta_aucs: Hartung-Knapp-Sidik-Jonkman CI on Paule-Mandel tau^2,
with prediction interval); sensitivity and specificity summaries: binomial-normal GLMM (meta_proportions). The AUC of
the pooled histograms (interval-censored EM over the sites' merged cells) is secondary, because the minimum-cell-count
rule blurs it. Every interval carries its "method"; pooled and summary figures also their "estimand".
"""

from __future__ import annotations

import math
import re

import numpy as np

from common import metrics as M

NAN = float("nan")


def youden_from_histograms(hist_pos, hist_neg) -> dict:
    """Threshold (a bin edge) maximising sensitivity + specificity − 1 on pooled inner-validation histograms.

    Among equally good edges the middle one is taken (a plateau's end sits on one patient's score). 0.5 when a class
    is missing or nothing beats chance, like common.training.choose_threshold.
    """
    hp, hn = np.asarray(hist_pos, dtype=np.float64), np.asarray(hist_neg, dtype=np.float64)
    out = {"n_pos": float(hp.sum()), "n_neg": float(hn.sum()), "threshold": 0.5, "youden": NAN}
    if hp.sum() <= 0 or hn.sum() <= 0:
        out["note"] = "one class missing in the pooled validation split: 0.5"
        return out
    roc = M.histogram_roc(hp, hn, M.edges_for(hp.size))
    j = np.asarray(roc["tpr"]) - np.asarray(roc["fpr"])
    best = np.flatnonzero(np.isclose(j, j.max(), rtol=0, atol=1e-12))
    out["youden"] = float(j.max())
    if j.max() <= 0:
        out["note"] = "no cut beats chance on the validation split: 0.5"
        return out
    out["threshold"] = float(roc["threshold"][int(best[len(best) // 2])])
    return out


def site_metrics(rep: dict) -> dict:
    """One site's report → accuracy/sensitivity/specificity/PPV/NPV (Wilson) and AUC (``M.auc_interval``: DeLong
    logit CI from the site's variance; Newcombe's score interval where that is degenerate; n/a with the reason).

    ``n_folds``: how many fold models scored the site's patients (its tenfold AUC ranks their scores together)."""
    c = M.Confusion(tp=rep["tp"], fp=rep["fp"], tn=rep["tn"], fn=rep["fn"])
    out = M.confusion_metrics(c)
    auc = rep["auc"] if rep.get("auc", -1) >= 0 else NAN
    var = rep["auc-var"] if rep.get("auc-var", -1) >= 0 else NAN
    out["auc"] = M.auc_interval(auc, var, int(rep["n-pos"]), int(rep["n-neg"]))
    out["auc"]["method"] += " (site-computed AUC and variance)" if out["auc"]["method"].startswith("DeLong") else ""
    out.update(n=int(rep["n"]), n_pos=int(rep["n-pos"]), n_neg=int(rep["n-neg"]), confusion=c.as_dict())
    out["n_folds"] = len(rep.get("folds") or [])
    out["brier"] = rep["brier-sum"] / rep["n"] if rep["n"] else NAN
    return out


def calibration_from_histograms(hist_pos, hist_neg, n_bins: int = M.N_CALIBRATION_BINS) -> dict:
    """Reliability data from pooled histograms: per coarse bin, bin-centre score and observed malignant fraction."""
    hp, hn = np.asarray(hist_pos, dtype=np.float64), np.asarray(hist_neg, dtype=np.float64)
    fine = hp.size
    edges = np.linspace(0, fine, n_bins + 1).astype(int)
    centres = (M.DEFAULT_EDGES[:-1] + M.DEFAULT_EDGES[1:]) / 2
    pred, true, count = [], [], []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        p, n = hp[a:b].sum(), hn[a:b].sum()
        if p + n <= 0:
            continue
        pred.append(float(np.dot(hp[a:b] + hn[a:b], centres[a:b]) / (p + n)))
        true.append(float(p / (p + n)))
        count.append(float(p + n))
    total = sum(count)
    ece = float(sum(c * abs(x - y) for c, x, y in zip(count, pred, true, strict=True)) / total) if total else NAN
    return {"prob_pred": pred, "prob_true": true, "count": count, "ece": ece, "source": "pooled histograms"}


def pooled_histograms(reports: dict[str, dict], secure: dict | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """One tag's pooled (malignant, benign) histograms and what to publish of them.

    With a completed secure sum (server/securesum.py) over some sites, their exact pooled histograms join the other
    sites' suppressed ones (interval-censored EM when there are any). Scalars (AUC, ECE, threshold) come from the
    pooled histograms; the curves that would show cells (ROC, calibration) are published from the pooled histograms
    with adjacent cells merged until each holds at least the participants' highest minimum cell count (`publish`).
    Without one, every site's histogram is already suppressed and published as pooled."""
    summed = secure is not None and secure.get("mode") == "secure"
    inside = set(secure["participants"]) if summed else set()
    hp = [np.asarray(r["hist-pos"], dtype=np.float64) for s, r in reports.items() if s not in inside]
    hn = [np.asarray(r["hist-neg"], dtype=np.float64) for s, r in reports.items() if s not in inside]
    info = dict(secure["info"]) if secure is not None else {"pooling": "per-site suppressed"}
    if not summed:
        em_pos, em_neg = M.pooled_histogram_em(hp), M.pooled_histogram_em(hn)
        return em_pos, em_neg, {**info, "published": (em_pos, em_neg)}
    total = np.asarray(secure["sum"], dtype=np.float64)
    sp, sn = total[: total.size // 2], total[total.size // 2 :]
    pos = sp + (M.pooled_histogram_em(hp + [sp]) - sp if any(h.sum() for h in hp) else 0.0)
    neg = sn + (M.pooled_histogram_em(hn + [sn]) - sn if any(h.sum() for h in hn) else 0.0)
    published = (M.suppress_small_cells(pos, secure["floor"]), M.suppress_small_cells(neg, secure["floor"]))
    return pos, neg, {**info, "published": published}


def combine(reports: dict[str, dict], secure: dict | None = None) -> dict:
    """Per-site metrics, pooled counts, random-effects summaries, pooled-histogram AUC/ROC/calibration of one tag.
    `secure`: the tag's secure sum (collect_reports in server/protocols.py), if one ran."""
    reports = {s: r for s, r in reports.items() if r.get("n", 0) > 0}
    per_site = {s: site_metrics(r) for s, r in sorted(reports.items())}
    out: dict = {"per_site": per_site, "n_sites": len(per_site)}
    if not per_site:
        return out
    c = M.Confusion(*(sum(r[k] for r in reports.values()) for k in ("tp", "fp", "tn", "fn")))
    pooled = M.confusion_metrics(c)
    for prop in pooled.values():
        prop["estimand"] = M.POOLED_ESTIMAND
    n = int(sum(r["n"] for r in reports.values()))
    pooled.update(n=n, n_pos=int(c.tp + c.fn), n_neg=int(c.fp + c.tn), confusion=c.as_dict())
    pooled["brier"] = sum(r["brier-sum"] for r in reports.values()) / n
    em_pos, em_neg, info = pooled_histograms(reports, secure)
    pub_pos, pub_neg = info.pop("published")
    pooled["auc_histogram"] = M.histogram_auc(em_pos, em_neg)
    if info["pooling"] == "secure sum":  # the published (merged-cell) pooled histograms
        pooled["auc_histogram_uniform"] = M.histogram_auc(pub_pos, pub_neg)
    else:  # the sites' suppressed histograms summed without redistribution
        hp, hn = ([np.asarray(r[k], dtype=np.float64) for r in reports.values()] for k in ("hist-pos", "hist-neg"))
        pooled["auc_histogram_uniform"] = M.histogram_auc(np.sum(hp, axis=0), np.sum(hn, axis=0))
    out["roc"] = M.histogram_roc(pub_pos, pub_neg)
    out["calibration"] = calibration_from_histograms(pub_pos, pub_neg)
    out["calibration"]["ece"] = calibration_from_histograms(em_pos, em_neg)["ece"]
    out["pooling"] = info
    meta: dict = {}
    with_both = [m for m in per_site.values() if m["n_pos"] > 0 and m["n_neg"] > 0]
    if with_both:
        meta["auc"] = M.meta_aucs(
            [m["auc"]["value"] for m in with_both],
            [m["auc"]["var"] for m in with_both],
            [m["n_pos"] for m in with_both],
            [m["n_neg"] for m in with_both],
        )
    sites = list(per_site.values())
    if any(m["n_pos"] for m in sites):
        meta["sensitivity"] = M.meta_proportions([m["confusion"]["tp"] for m in sites], [m["n_pos"] for m in sites])
    if any(m["n_neg"] for m in sites):
        meta["specificity"] = M.meta_proportions([m["confusion"]["tn"] for m in sites], [m["n_neg"] for m in sites])
    out["random_effects"] = meta
    # The headline AUC (paper table): the meta-analysed per-site AUC, CI from the meta-analysis.
    if "auc" in meta:
        a = meta["auc"]
        pooled["auc"] = {
            "value": a["estimate"],
            "lo": a["lo"],
            "hi": a["hi"],
            "k": a["k"],
            "method": f"random-effects over sites: {a['method']}",
            "estimand": a["estimand"],
        }
    else:
        pooled["auc"] = {
            "value": NAN,
            "lo": NAN,
            "hi": NAN,
            "method": "n/a",
            "estimand": "n/a: no site with both classes",
        }
    out["pooled"] = pooled
    return out


def _diff_var_accuracy(b: int, c: int, n: int) -> float:
    """Variance of a paired difference in proportions (b − c)/n (McNemar-type, Agresti 10.1)."""
    if n <= 0:
        return NAN
    return ((b + c) / n - ((b - c) / n) ** 2) / n


def paired_contrast(comparisons: dict[str, dict], label_a: str, label_b: str) -> dict:
    """Per-site paired summaries (A − B on the same patients) → random-effects pooled differences with CI and PI.

    AUC: the sites' paired DeLong differences, pooled by ``M.meta_auc_differences`` (HKSJ on Paule–Mandel τ²), which
    uses every site with both protocols and both classes, also where its paired variance is 0 (listed in
    ``auc.imputed_sites``); a site it cannot use is named in ``excluded`` with the reason. Accuracy, sensitivity,
    specificity: (b − c)/n per site with its paired variance (HKSJ); plus the pooled exact McNemar on the summed
    discordant counts.
    """
    out: dict = {"a": label_a, "b": label_b, "per_site": {}, "excluded": {}}
    for s, r in sorted(comparisons.items()):
        if r.get("n", 0) <= 0:
            out["excluded"][s] = f"no patients scored under both {label_a} and {label_b}"
    rows = {s: r for s, r in sorted(comparisons.items()) if r.get("n", 0) > 0}
    out["n_sites"] = len(rows)
    if not rows:
        out["auc"] = {"k": 0}
        return out
    auc_sites, auc_e, auc_v, auc_m, auc_n, auc_a = [], [], [], [], [], []
    props: dict[str, tuple[list, list]] = {"accuracy": ([], []), "sensitivity": ([], []), "specificity": ([], [])}
    for site, r in rows.items():
        entry = {"n": r["n"], "n_pos": r["n-pos"], "n_neg": r["n-neg"], "auc_a": r["auc_a"], "auc_b": r["auc_b"]}
        entry["auc_diff"] = r["auc-diff"]
        entry["auc_diff_var"] = r["auc-diff-var"]
        if r["n-pos"] > 0 and r["n-neg"] > 0 and r["auc_a"] >= 0 and r["auc_b"] >= 0:
            auc_sites.append(site)
            auc_e.append(r["auc-diff"])
            auc_v.append(r["auc-diff-var"] if r["auc-diff-var"] > 0 else NAN)
            auc_m.append(r["n-pos"])
            auc_n.append(r["n-neg"])
            auc_a.append((r["auc_a"] + r["auc_b"]) / 2)
        else:
            out["excluded"][site] = (
                "no malignant patients among the paired patients (no AUC)"
                if r["n-pos"] <= 0
                else "no benign patients among the paired patients (no AUC)"
            )
        for name, suffix, n in (
            ("accuracy", "", r["n"]),
            ("sensitivity", "-pos", r["n-pos"]),
            ("specificity", "-neg", r["n-neg"]),
        ):
            b, c = r[f"b{suffix}"], r[f"c{suffix}"]
            if n > 0:
                d = (b - c) / n
                v = _diff_var_accuracy(b, c, n)
                entry[f"{name}_diff"] = d
                # A site with no discordant pair carries no information on the difference's spread: a floor of
                # half a discordant pair keeps it in with a finite weight (like the 0.5 continuity correction).
                props[name][0].append(d)
                props[name][1].append(max(v, 0.5 / n**2))
        out["per_site"][site] = entry
    if auc_e:
        res = M.meta_auc_differences(auc_e, auc_v, auc_m, auc_n, auc_a)
        res["sites"] = auc_sites
        res["imputed_sites"] = [auc_sites[i] for i in res.pop("imputed")]
        res["estimand"] = "mean over sites of the paired AUC difference (random-effects summary)"
        out["auc"] = res
    else:
        out["auc"] = {"k": 0}
    for name, (e, v) in props.items():
        out[name] = M.random_effects_meta(e, v) if e else {"k": 0}
    b = sum(r["b"] for r in rows.values())
    c = sum(r["c"] for r in rows.values())
    out["mcnemar"] = M.mcnemar_exact(b, c)
    out["n"] = int(sum(r["n"] for r in rows.values()))
    return out


def reader_summary(readers: dict[str, dict]) -> dict:
    """Model vs reader per site and pooled: accuracies (Wilson) and exact McNemar on the discordant counts."""
    rows = {s: r for s, r in sorted(readers.items()) if r.get("n", 0) > 0}
    out: dict = {"per_site": {}, "n_sites": len(rows)}
    for site, r in rows.items():
        out["per_site"][site] = {
            "n": r["n"],
            "model_accuracy": M.proportion(r["model-correct"], r["n"]),
            "reader_accuracy": M.proportion(r["reader-correct"], r["n"]),
            "mcnemar": M.mcnemar_exact(r["b"], r["c"]),
        }
    if rows:
        n = sum(r["n"] for r in rows.values())
        out["n"] = n
        out["model_accuracy"] = M.proportion(sum(r["model-correct"] for r in rows.values()), n)
        out["reader_accuracy"] = M.proportion(sum(r["reader-correct"] for r in rows.values()), n)
        out["reader_sensitivity"] = M.proportion(
            sum(r["reader-tp"] for r in rows.values()), sum(r["n-pos"] for r in rows.values())
        )
        out["reader_specificity"] = M.proportion(
            sum(r["reader-tn"] for r in rows.values()), sum(r["n-neg"] for r in rows.values())
        )
        out["mcnemar"] = M.mcnemar_exact(sum(r["b"] for r in rows.values()), sum(r["c"] for r in rows.values()))
    return out


def verdict(contrast: dict) -> str:
    """The generalization verdict in one plain sentence, from the tenfold − site-held-out AUC contrast."""
    a = contrast.get("auc", {})
    if not a.get("k"):
        return (
            "No verdict: no site had both protocols' scores with both classes, so tenfold and site-held-out could not "
            "be compared on the same patients."
        )
    est, lo, hi, k = a["estimate"], a["lo"], a["hi"], a["k"]
    span = (
        f"{est:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}; {k} site{'s' if k != 1 else ''}, paired per-site DeLong "
        f"differences, random effects with Hartung-Knapp-Sidik-Jonkman interval)"
    )
    excluded = contrast.get("excluded") or {}
    if excluded:
        span += "; not used: " + "; ".join(f"{s} ({why})" for s, why in sorted(excluded.items()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"Tenfold minus site-held-out AUC on the same patients: {span}; too few sites for an interval."
    if k == 1:
        return (
            f"Tenfold minus site-held-out AUC on one site's patients only: {span}. One site says nothing about "
            "other hospitals: no verdict on generalization."
        )
    if lo > 0:
        return (
            f"The model does not generalize fully to unseen hospitals: AUC on a site's own patients was higher when "
            f"that site helped train (tenfold) than when it was held out, by {span}."
        )
    if hi < 0:
        return f"Held-out sites scored higher than under tenfold (tenfold minus site-held-out AUC {span})."
    return (
        f"No evidence of a generalization gap: tenfold minus site-held-out AUC on the same patients was {span}; the "
        f"interval includes 0 (absence of evidence, not proof of equivalence)."
    )


# ----- differential privacy ------------------------------------------------------------------------------------------
def empty_privacy() -> dict:
    """A site's privacy summary before any reply: no DP, ε and δ unknown (−1), no rounds."""
    return {"dp": False, "epsilon": -1.0, "delta": -1.0, "dp_rounds": 0, "plain_rounds": 0, "refused_rounds": 0,
            "refusals": []}  # fmt: skip


def privacy_by_site(rounds: list[dict]) -> dict[str, dict]:
    """Per site, from round records (server/strategy.RoundRecord as dicts: `accepted` site → train metrics, `failed`
    site → the site's refusal text): whether it trained with DP, the ε it reported last (its ledger's total over
    every model trained on its data, RDP at its δ), rounds trained with / without DP, rounds refused and why.

    Only what the sites sent is used: ε comes from the reply schema's `epsilon` (−1 when DP is off).
    """
    out: dict[str, dict] = {}

    def entry(site: str) -> dict:
        return out.setdefault(site, empty_privacy())

    for rec in rounds:
        for site, m in rec.get("accepted", {}).items():
            e = entry(site)
            if int(m.get("dp", 0)):
                e["dp"] = True
                e["dp_rounds"] += 1
                e["epsilon"] = max(e["epsilon"], float(m.get("epsilon", -1.0)))
                e["delta"] = max(e["delta"], float(m.get("delta", -1.0)))
            else:
                e["plain_rounds"] += 1
        for site, reason in rec.get("failed", {}).items():
            if site.endswith(" (evaluate)"):
                continue
            e = entry(site)
            e["refused_rounds"] += 1
            reason = _refusal_text(reason)
            if reason not in e["refusals"]:
                e["refusals"].append(reason)
    return out


def _refusal_text(reason) -> str:
    """The site's own message from Flower's Error reason ("<class 'client.tasks.SiteRefusal'>:<'message'>", or what
    server/replyfilter.error_reason left of it)."""
    text = re.sub(r"^<class '[\w.]+'?>?:<'", "", str(reason).strip())
    return (text[:-2] if text.endswith("'>") else text)[:300]


def merge_privacy(parts: list[dict[str, dict]]) -> dict[str, dict]:
    """Combine privacy_by_site() results of several trainings (protocol units) into one per-site summary; ε is the
    largest reported (the ledger only grows, so that is the site's total at its last DP round)."""
    out: dict[str, dict] = {}
    for part in parts:
        for site, p in part.items():
            e = out.setdefault(site, empty_privacy())
            e["dp"] = e["dp"] or bool(p.get("dp"))
            e["epsilon"] = max(e["epsilon"], float(p.get("epsilon", -1.0)))
            e["delta"] = max(e["delta"], float(p.get("delta", -1.0)))
            for key in ("dp_rounds", "plain_rounds", "refused_rounds"):
                e[key] += int(p.get(key, 0))
            e["refusals"] += [r for r in p.get("refusals", []) if r not in e["refusals"]]
    return out


def dp_sweep_entry(budget: float, results: dict | None, status: str, protocol: str = "tenfold") -> dict:
    """One row of the accuracy-vs-ε sweep from a run's results.json: pooled and per-site accuracy / AUC of
    `protocol`, ε each site reported, refused rounds. `budget` math.inf is the non-DP reference."""
    entry: dict = {"budget": budget, "status": status}
    p = ((results or {}).get("protocols") or {}).get(protocol) or {}
    pooled = p.get("pooled") or {}
    entry["pooled"] = {k: pooled[k] for k in ("accuracy", "sensitivity", "specificity", "n") if k in pooled}
    entry["auc"] = pooled.get("auc", {})
    entry["per_site"] = {
        s: {"n": m["n"], "accuracy": m["accuracy"], "auc": m["auc"]} for s, m in (p.get("per_site") or {}).items()
    }
    per_site = ((results or {}).get("privacy") or {}).get("per_site") or {}
    entry["epsilon_spent"] = {s: v["epsilon"] for s, v in per_site.items() if v.get("dp")}
    entry["refused_rounds"] = sum(int(v.get("refused_rounds", 0)) for v in per_site.values())
    return entry


def histogram_brier(hist_pos, hist_neg) -> float:
    """Brier score from score histograms, each patient at its bin's centre (error ≤ half a bin width: 0.005)."""
    hp, hn = np.asarray(hist_pos, dtype=np.float64), np.asarray(hist_neg, dtype=np.float64)
    n = hp.sum() + hn.sum()
    if n <= 0:
        return NAN
    centres = (M.DEFAULT_EDGES[:-1] + M.DEFAULT_EDGES[1:]) / 2
    return float((np.dot(hp, (1.0 - centres) ** 2) + np.dot(hn, centres**2)) / n)


def evaluation_score(per_site: dict[str, dict], summary: dict) -> dict:
    """AUC of the summed histograms, histogram Brier and the sites' own AUCs of one evaluation round."""
    hp, hn = summary.get("hist-pos"), summary.get("hist-neg")
    pooled = M.histogram_auc(hp, hn) if hp and sum(hp) > 0 and sum(hn) > 0 else NAN
    sites = {s: (m["auc"] if m.get("auc", -1) >= 0 else NAN) for s, m in sorted(per_site.items())}
    return {
        "n": int(summary.get("num-examples", 0)),
        "pooled_auc": pooled,
        "brier": histogram_brier(hp, hn) if hp else NAN,
        "site_auc": sites,
    }


def improvement(initial: dict, final: dict) -> dict:
    """The trained model against the starting one on the same patients: {initial, final, change} of the pooled
    histogram AUC and Brier, and of each site's own AUC. `initial`/`final`: {"evaluation": {site: metrics},
    "summary": summed metrics} of an evaluation round. Brier's change is negative when the model got better."""
    a = evaluation_score(initial["evaluation"], initial["summary"])
    b = evaluation_score(final["evaluation"], final["summary"])
    out = {"n": {"initial": a["n"], "final": b["n"]}}
    for key in ("pooled_auc", "brier"):
        out[key] = {"initial": a[key], "final": b[key], "change": b[key] - a[key]}
    out["site_auc"] = {
        s: {"initial": a["site_auc"].get(s, NAN), "final": v, "change": v - a["site_auc"].get(s, NAN)}
        for s, v in b["site_auc"].items()
    }
    return out
