"""The protocol report, rendered from results.json only: report.md, a self-contained report.html (figures embedded as
base64 PNG) and the PNGs themselves.

The document is first built as a list of blocks (heading, paragraph, table, figure) from the results dict, then
written twice (Markdown and HTML), so both carry the same numbers; every number comes from results.json (a test
parses report.md and checks). `render(results, out)` is all a caller needs; `python -m server.report OUT` re-renders a
folder's results.json (e.g. after `simulate run` added the centralized baseline).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from common.evaluation import fmt_auc, fmt_prop, paper_rows
from server.protocol_registry import by_results_key, results_order

CI_LEVEL = 95

Block = tuple


def _f(x, nd: int = 3) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return f"{x:.{nd}f}" if math.isfinite(x) else "n/a"


def _signed(x, nd: int = 3) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return f"{x:+.{nd}f}" if math.isfinite(x) else "n/a"


def _site_auc(a: dict) -> str:
    """A per-site AUC: its interval, marked † where it is Newcombe's (DeLong's was degenerate), or n/a with why."""
    if not a or not math.isfinite(float(a.get("value", float("nan")))):
        return f"n/a ({a['note']})" if a and a.get("note") else "n/a"
    return fmt_auc(a) + (" †" if str(a.get("method", "")).startswith("Newcombe") else "")


def _meta(m: dict | None) -> str:
    if not m or not m.get("k"):
        return "n/a"
    text = f"{_f(m['estimate'])} ({_f(m['lo'])}–{_f(m['hi'])}), k = {m['k']}"
    if math.isfinite(float(m.get("pi_lo", float("nan")))):
        text += f"; prediction interval for a new site {_f(m['pi_lo'])}–{_f(m['pi_hi'])}"
    return text + (f" [{m['method']}]" if m.get("method") else "")


def _auc_estimand(name: str, auc: dict) -> str:
    """What a headline AUC describes, per row (results.json `estimand`; older files: by protocol)."""
    method = str(auc.get("method", ""))
    if method.startswith("random-effects") or (not method and name != "centralized"):
        k = auc.get("k")
        over = f"over {k} sites" if k else "over sites"
        return f"random-effects summary {over} (typical site; Hartung-Knapp-Sidik-Jonkman CI)"
    if method == "n/a":
        return "n/a"
    return "pooled over the patients of these sites (DeLong on the pooled out-of-fold scores)"


def _prop(m: dict | None) -> str:
    return fmt_prop(m) if m else "n/a"


# ----- figures -------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _protocols(results: dict) -> list[tuple[str, dict]]:
    """Every protocol block with pooled results: the registered ones in registry order, then any other (e.g. the
    centralized baseline simulate adds): none is left out."""
    p = results.get("protocols", {})
    order = [*results_order(), *sorted(k for k in p if k not in results_order())]
    return [(k, p[k]) for k in order if k in p and p[k].get("pooled")]


def fig_roc(results: dict, path: Path) -> bool:
    """Per protocol: each site's operating point (exact counts at its models' own thresholds, sized by n), the
    random-effects summary point, and the pooled-histogram curve dashed. The curve comes from histograms the sites
    suppressed (minimum cell count): at small sites it can be far off, so it is drawn as approximate, never alone."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    drawn = False
    for i, (name, p) in enumerate(_protocols(results)):
        colour = f"C{i}"
        label = p.get("label", name)
        sites = [m for m in (p.get("per_site") or {}).values() if m.get("n_pos") and m.get("n_neg")]
        if sites:
            x = [1 - m["specificity"]["value"] for m in sites]
            y = [m["sensitivity"]["value"] for m in sites]
            ax.scatter(x, y, s=[12 + 4 * m["n"] for m in sites], color=colour, alpha=0.35, edgecolors="none")
            drawn = True
        re = p.get("random_effects") or {}
        if re.get("sensitivity") and re.get("specificity"):
            ax.plot(1 - re["specificity"]["estimate"], re["sensitivity"]["estimate"], marker="D", ms=8, color=colour,
                    ls="none", label=f"{label}: summary point; AUC {fmt_auc(p['pooled']['auc'])}")  # fmt: skip
            drawn = True
        roc = p.get("roc") or {}
        if roc.get("tpr"):
            ax.plot(roc["fpr"], roc["tpr"], ls="--", lw=1, color=colour, alpha=0.6)
            drawn = True
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
           title="Operating points per site (dots), summary (◆);\ndashed: approximate ROC from pooled histograms (merged cells)")  # fmt: skip
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def fig_forest(results: dict, path: Path) -> bool:
    protos = [(n, p) for n, p in _protocols(results) if p.get("per_site") and n != "centralized"]
    if not protos:
        return False
    name, p = protos[0]
    plt = _plt()
    measures = ("sensitivity", "specificity", "auc")
    sites = list(p["per_site"])
    fig, axes = plt.subplots(1, 3, figsize=(11, 0.4 * len(sites) + 2), sharey=True)
    for ax, meas in zip(axes, measures, strict=True):
        for i, site in enumerate(sites):
            m = p["per_site"][site][meas]
            v, lo, hi = m["value"], m["lo"], m["hi"]
            if all(math.isfinite(float(x)) for x in (v, lo, hi)):
                ax.errorbar(v, i, xerr=[[max(v - lo, 0.0)], [max(hi - v, 0.0)]], fmt="s", c="k", ms=4)
        re = p.get("random_effects", {}).get(meas)
        y = len(sites)
        if re and re.get("k") and math.isfinite(re["estimate"]):
            ax.fill([re["lo"], re["estimate"], re["hi"], re["estimate"]], [y, y + 0.3, y, y - 0.3], c="tab:blue")
            if math.isfinite(re.get("pi_lo", float("nan"))):
                ax.plot([re["pi_lo"], re["pi_hi"]], [y, y], c="tab:blue", lw=1, ls="--")
        ax.set(xlim=(0, 1), title=meas)
    axes[0].set_yticks(range(len(sites) + 1), [*sites, "random effects"])
    axes[0].invert_yaxis()
    fig.suptitle(f"{p.get('label', name)}: per-site {CI_LEVEL}% CIs, summary with prediction interval (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def fig_matrix(results: dict, path: Path) -> bool:
    matrix = results.get("protocols", {}).get("local-only", {}).get("matrix")
    if not matrix:
        return False
    plt = _plt()
    sites = sorted(matrix)
    tests = sorted({t for row in matrix.values() for t in row})
    data = np.full((len(sites), len(tests)), np.nan)
    for i, s in enumerate(sites):
        for j, t in enumerate(tests):
            if t in matrix[s]:
                data[i, j] = matrix[s][t]["auc"]["value"]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(tests), 1 + 0.5 * len(sites)))
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tests)), tests, rotation=60, fontsize=7)
    ax.set_yticks(range(len(sites)), sites, fontsize=7)
    ax.set(xlabel="evaluated at", ylabel="trained at (local-only)", title="cross-site AUC")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def fig_confusion(results: dict, path: Path) -> bool:
    protos = _protocols(results)
    if not protos:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(protos), figsize=(3 * len(protos), 3), squeeze=False)
    for ax, (name, p) in zip(axes[0], protos, strict=True):
        c = p["pooled"]["confusion"]
        grid = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]], dtype=float)
        ax.imshow(grid, cmap="Blues")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:g}", ha="center", va="center")
        ax.set_xticks([0, 1], ["benign", "malignant"])
        ax.set_yticks([0, 1], ["benign", "malignant"])
        ax.set(xlabel="called", ylabel="truth", title=p.get("label", name))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def fig_calibration(results: dict, path: Path) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    drawn = False
    for name, p in _protocols(results):
        cal = p.get("calibration") or p["pooled"].get("calibration")
        if cal and cal.get("prob_pred"):
            ax.plot(cal["prob_pred"], cal["prob_true"], "o-", label=p.get("label", name))
            drawn = True
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="predicted P(malignant)", ylabel="observed fraction malignant", title="calibration")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


FIGURES = (
    ("roc.png", fig_roc, "Operating points per site with the summary point, and approximate ROC curves, per protocol"),
    ("forest.png", fig_forest, "Per-site sensitivity, specificity and AUC with the random-effects summary"),
    ("cross_site_matrix.png", fig_matrix, "Cross-site matrix (local-only models)"),
    ("confusion.png", fig_confusion, "Confusion matrices"),
    ("calibration.png", fig_calibration, "Calibration"),
)


# ----- the document --------------------------------------------------------------------------------------------------
def _paper_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    entries = [
        (p.get("label", name), p["pooled"], _auc_estimand(name, p["pooled"]["auc"])) for name, p in _protocols(results)
    ]
    return paper_rows(entries, bool(results.get("synthetic")), results["paper"])


def build(results: dict, figures: dict[str, str]) -> list[Block]:
    """The report as blocks; only numbers taken from `results` appear in it."""
    b: list[Block] = [("h1", "spinefed validation report")]
    if results.get("synthetic"):
        b.append(
            ("warn", "Synthetic data: every number below comes from the project's DICOM phantom, not from patients.")
        )
    elif results.get("synthetic") is None:
        b.append(("warn", "Data origin not stated by the caller (synthetic or real is unknown to this report)."))
    if results.get("quick"):
        b.append(
            ("warn", "Quick mode: a smoke test of the whole path on a reduced plan. These figures are not evidence.")
        )
    b += _warning_blocks(results)
    exp = results["experiment"]
    b.append(
        (
            "p",
            f"Protocol `{results['protocol']}` over {results['n_sites']} site(s), "
            f"{results['n_patients']} patients; model {exp['model'].get('arch', '?')} "
            f"(trainable {exp['model'].get('trainable', 'all')}), {exp['rounds']} round(s) of {exp['local_epochs']} "
            f"local epoch(s). Every proportion is given with its Wilson {CI_LEVEL}% CI and k/n; AUCs with DeLong or "
            f"random-effects {CI_LEVEL}% CIs. Thresholds come from the training sites' inner validation splits only. "
            "Two kinds of figure appear, and each is named where it appears: pooled over the patients of these sites "
            "(describes these sites), or a random-effects summary over sites (describes the typical site; its "
            "prediction interval is where a new site is expected).",
        )
    )
    if results.get("pretrained") is False:
        b.append(("p", "No pretrained weights: the model was trained from scratch."))
    if results.get("verdict"):
        b += [("h2", "Generalization verdict"), ("p", results["verdict"])]
        headline = stratified_headline(results)
        if headline:
            b.append(("p", headline))
    b += [("h2", "Results in the paper's format")]
    head, rows = _paper_rows(results)
    b.append(("table", head, rows))
    b.append(
        (
            "p",
            "Accuracy, sensitivity and specificity in this table are pooled over the patients of these sites (Wilson "
            "intervals that treat patients as independent across sites): they describe these sites, not a new one. "
            "The AUC estimand column says per row what the headline AUC is: for federated rows a random-effects "
            "summary of the per-site AUCs over sites (site is the unit; Hartung-Knapp-Sidik-Jonkman interval on the "
            "Paule-Mandel between-site variance), for the centralized baseline the DeLong AUC of the pooled "
            "out-of-fold scores (patients pooled over sites).",
        )
    )
    for name, p in _protocols(results):
        if name == "centralized":
            continue
        b.append(("h3", p.get("label", name)))
        re = p.get("random_effects", {})
        b.append(
            (
                "p",
                f"Random-effects summaries over sites (the typical site; the prediction interval is for a new site): "
                f"AUC {_meta(re.get('auc'))}; sensitivity {_meta(re.get('sensitivity'))}; "
                f"specificity {_meta(re.get('specificity'))}. Pooled over the patients of these sites: pooled-histogram "
                f"AUC (secondary; {_pooled_source(p)}) {_f(p['pooled'].get('auc_histogram'))}; "
                f"Brier score {_f(p['pooled'].get('brier'))} (n = {p['pooled']['n']}).",
            )
        )
        kind = by_results_key(name)
        pooled_folds = kind is not None and kind.per_fold and not kind.alone  # out-of-fold scores of several models
        folds = pooled_folds and any(m.get("n_folds") for m in p["per_site"].values())
        rows = [
            [
                site,
                f"{m['n']} ({m['n_pos']}/{m['n_neg']})",
                _prop(m["sensitivity"]),
                _prop(m["specificity"]),
                _prop(m["accuracy"]),
                _site_auc(m["auc"]),
                *([str(m.get("n_folds", "n/a"))] if folds else []),
            ]
            for site, m in p["per_site"].items()
        ]
        head = ["site", "n (malignant/benign)", "sensitivity", "specificity", "accuracy", "AUC"]
        b.append(("table", head + (["fold models pooled"] if folds else []), rows))
        notes = ["Per-site AUC: DeLong, logit interval."]
        if any(str(m["auc"].get("method", "")).startswith("Newcombe") for m in p["per_site"].values()):
            notes.append(
                "†: DeLong's variance is 0 here (AUC 0 or 1, tied scores, or a class of one patient), so the "
                "interval is Newcombe's Wilson-type score interval for the AUC, which never has zero width."
            )
        if folds:
            notes.append(
                "Under tenfold a site's AUC ranks together the out-of-fold scores of several fold models (last "
                "column), each a different model: it is not the AUC of any single model."
            )
        b.append(("p", " ".join(notes)))
        if kind is not None and kind.report is not None:  # what this protocol adds (server/protocol_kinds.py)
            b += kind.report(p)
    contrasts = results.get("contrasts", {})
    if contrasts:
        b.append(("h2", "Paired contrasts (same patients)"))
        rows = []
        for _, c in sorted(contrasts.items()):
            for meas in ("auc", "accuracy", "sensitivity", "specificity"):
                m = c.get(meas) or {}
                if m.get("k"):
                    rows.append(
                        [
                            f"{c['a']} − {c['b']}",
                            meas,
                            _signed(m["estimate"]),
                            f"{_signed(m['lo'])} to {_signed(m['hi'])}",
                            str(m["k"]),
                        ]
                    )
            for key, meas in (("bootstrap_auc", "auc"), ("bootstrap_accuracy", "accuracy")):
                if c.get(key):
                    m = c[key]
                    rows.append(
                        [
                            f"{c['a']} − {c['b']}",
                            f"{meas} (paired bootstrap over sites)",
                            _signed(m["difference"]),
                            f"{_signed(m['lo'])} to {_signed(m['hi'])}",
                            str(m["n_clusters"]),
                        ]
                    )
        b.append(("table", ["contrast", "measure", "difference", f"{CI_LEVEL}% CI", "sites"], rows))
        notes = []
        for _, c in sorted(contrasts.items()):
            if c.get("mcnemar"):
                mc = c["mcnemar"]
                notes.append(
                    f"{c['a']} vs {c['b']}: exact McNemar on correct calls, b = {mc['b']}, c = {mc['c']}, "
                    f"p = {_f(mc['p'])} (n = {c['n']})."
                )
        for _, c in sorted(contrasts.items()):
            auc = c.get("auc") or {}
            if c.get("excluded"):
                why = "; ".join(f"{s}: {r}" for s, r in sorted(c["excluded"].items()))
                notes.append(f"{c['a']} − {c['b']}: sites not in the AUC contrast: {why}.")
            if auc.get("imputed_sites"):
                notes.append(
                    f"{c['a']} − {c['b']}: paired DeLong variance 0 or undefined at "
                    f"{', '.join(auc['imputed_sites'])}; used with the size-based variance every site gets."
                )
        notes.append(
            "Paired differences are random-effects summaries over sites (mean site-level difference; "
            "Hartung-Knapp-Sidik-Jonkman interval)."
        )
        if notes:
            b.append(("p", " ".join(notes)))
    b += _stratified_blocks(results)
    matrix = results.get("protocols", {}).get("local-only", {}).get("matrix")
    if matrix:
        tests = sorted({t for row in matrix.values() for t in row})
        rows = [
            [s, *[_f(matrix[s][t]["auc"]["value"]) if t in matrix[s] else "–" for t in tests]] for s in sorted(matrix)
        ]
        b += [
            ("h2", "Cross-site matrix (local-only models: AUC)"),
            ("table", ["trained at \\ evaluated at", *tests], rows),
        ]
        b.append(("p", "Diagonal: the site's own held-out fold; off-diagonal: every patient of the other site."))
    readers = results.get("readers", {})
    for name, r in sorted(readers.items()):
        if not r.get("n"):
            continue
        mc = r["mcnemar"]
        b += [
            ("h2", f"Model ({name}) vs reader"),
            (
                "p",
                f"Model accuracy {_prop(r['model_accuracy'])}, reader accuracy {_prop(r['reader_accuracy'])} "
                f"(reader sensitivity {_prop(r['reader_sensitivity'])}, specificity {_prop(r['reader_specificity'])}); "
                f"exact McNemar b = {mc['b']}, c = {mc['c']}, p = {_f(mc['p'])}, computed at the sites.",
            ),
        ]
    b += _privacy_blocks(results)
    b += _membership_blocks(results)
    b += _pooling_blocks(results)
    sup = results.get("suppression", {})
    b.append(("h2", "Cost of the minimum cell count"))
    secure = [
        p.get("label", n) for n, p in _protocols(results) if (p.get("pooling") or {}).get("pooling") == "secure sum"
    ]
    if secure:
        b.append(
            (
                "p",
                f"Here the pooled histograms of {', '.join(secure)} come from secure sums of the sites' exact "
                "histograms, so the cost below does not apply to them (it is what sending each site's histogram with "
                "the minimum cell count would have cost).",
            )
        )
    if sup.get("measured"):
        b.append(
            (
                "p",
                f"Sites send score histograms with cells of at least {results['min_cell']} patients. On these data the "
                f"pooled-histogram AUC differed from the exact pooled AUC by {_signed(sup['suppressed_em_error'])} "
                f"(exact {_f(sup['exact_auc'])}, from suppressed histograms {_f(sup['suppressed_em_auc'])}); hence the "
                "headline AUC is the meta-analysis of the sites' own DeLong AUCs.",
            )
        )
    else:
        b.append(
            (
                "p",
                f"Sites send score histograms with cells of at least {results['min_cell']} patients. Measured on "
                f"realistic synthetic sites, that costs about {_f(sup.get('reference_error'))} in mean absolute pooled "
                "AUC error; hence the headline AUC is the meta-analysis of the sites' own DeLong AUCs.",
            )
        )
    prov = results["provenance"]
    b += [("h2", "Provenance")]
    # Identifiers as code: a tag or hash that happens to be all digits is not a number of the report.
    rows = [
        ["experiment fingerprint (sha256)", _code(prov["experiment_fingerprint"])],
        ["app bundle hash", _code(prov.get("app_bundle_hash")) or "not available"],
        ["evaluation tag", _code(prov["evaluation_tag"])],
        ["seed (experiment)", str(prov["seeds"]["experiment"])],
        ["seed (folds)", str(prov["seeds"]["folds"])],
    ]
    rows += [[f"cache hash {s}", _code(h) or "not sent"] for s, h in sorted(prov["cache_hashes"].items())]
    b.append(("table", ["item", "value"], rows))
    for file, _, caption in FIGURES:
        if file in figures:
            b.append(("img", file, caption))
    return b


def _warning_blocks(results: dict) -> list[Block]:
    """The warnings of results.json `warnings` (server/stratified.py), where a reader cannot miss them."""
    warnings = results.get("warnings") or []
    if not warnings:
        return []
    b: list[Block] = [("h2", "Warnings")]
    b += [("warn", w["text"]) for w in warnings]
    few = [w for w in warnings if w.get("kind") == "few-malignant"]
    if few:
        b.append(
            (
                "p",
                f"A sensitivity is not estimated usefully from fewer than {few[0]['min_malignant']} malignant cases "
                "(its 95% Wilson interval is then too wide to tell a useful test from a poor one): the threshold "
                "this report applies to sites and to acquisition subgroups.",
            )
        )
    return b


def _level_order(attr: dict) -> list[str]:
    """Reference first, then the other known levels by size, unknown last."""
    levels = attr["levels"]
    rest = sorted((lv for lv in levels if lv not in (attr["reference"], "unknown")), key=lambda lv: -levels[lv]["n"])
    return [attr["reference"], *rest, *(["unknown"] if "unknown" in levels else [])]


def _stratified_rows(block: dict) -> list[list[str]]:
    from server.stratified import fmt_p

    rows = []
    for attr in block.get("attributes", {}).values():
        hidden = f"suppressed (< {attr['floor']})"
        contrast = attr.get("contrast") or {}
        contrast_j = attr.get("contrast_j") or {}
        for lv in _level_order(attr):
            row = attr["levels"][lv]
            if row["n_sites"] <= 3:
                sites = f"{row['n_sites']} ({', '.join(row['sites'])})" if row["sites"] else "0"
            else:
                sites = str(row["n_sites"])
            if row["suppressed_sites"]:
                sites += f"; {hidden} at {', '.join(row['suppressed_sites'])}"
            level = f"`{lv}`" + (" (reference)" if lv == attr["reference"] else "")
            if not row["n"]:
                rows.append([attr["label"], level, sites, hidden, hidden, hidden, hidden, "–", "–", "–"])
                continue
            a = row["auc"]
            auc = f"{_f(a['estimate'])} ({_f(a['lo'])}–{_f(a['hi'])}), k = {a['k']}" if a.get("k") else "n/a"
            c = (contrast.get("levels") or {}).get(lv)
            if lv == attr["reference"]:
                diff, p = "reference", "–"
            elif lv == "unknown":
                diff, p = "not compared (level unknown)", "–"
            elif c is None:
                diff, p = "n/a (no site with both classes in this level)", "–"
            elif not math.isfinite(float(c["lo"])):
                diff, p = f"{_signed(c['difference'])} (no interval: as many parameters as site×level AUCs)", "n/a"
            else:
                diff, p = f"{_signed(c['difference'])} ({_signed(c['lo'])} to {_signed(c['hi'])})", fmt_p(c["p"])
            n = f"{row['n']} ({row['n_pos']}/{row['n_neg']})"
            rows.append([attr["label"], level, sites, n, _prop(row["sensitivity"]), _prop(row["specificity"]), auc,
                         diff, p, _j_cell(lv, attr["reference"], (contrast_j.get("levels") or {}).get(lv))])  # fmt: skip
    return rows


def _j_cell(level: str, reference: str, c: dict | None) -> str:
    """Youden J difference vs the reference at the operating point (server/stratified.operating_contrasts)."""
    from server.stratified import fmt_p

    if level == reference:
        return "reference"
    if c is None:
        return "–"
    if not math.isfinite(float(c["lo"])):
        return f"{_signed(c['difference'])} (no interval)"
    return f"{_signed(c['difference'])} ({_signed(c['lo'])} to {_signed(c['hi'])}), p {fmt_p(c['p'])}"


def _registry_rank(key: str) -> tuple[int, str]:
    order = results_order()
    return (order.index(key) if key in order else len(order), key)


def stratified_headline(results: dict) -> str | None:
    """The acquisition verdict shown under the generalization verdict: site-held-out's (where a site's own data
    never trained its model), else tenfold's."""
    strat = results.get("stratified") or {}
    for key in ("site-held-out", "tenfold"):
        if strat.get(key, {}).get("attributes"):
            label = (results.get("protocols", {}).get(key) or {}).get("label", key)
            return (
                f"By acquisition ({label}; details in 'Where the model fails to generalize'): {strat[key]['verdict']}"
            )
    return None


def _stratified_blocks(results: dict) -> list[Block]:
    """'Where the model fails to generalize': per protocol, results by acquisition attribute and level."""
    from server.stratified import single_site_text

    strat = results.get("stratified") or {}
    if not strat:
        return []
    protocols = results.get("protocols") or {}
    b: list[Block] = [("h2", "Where the model fails to generalize: results by acquisition")]
    b.append(
        (
            "p",
            "Patients are grouped by how they were scanned (read from the DICOM headers at each site: scanner "
            "manufacturer, field strength, fat-suppressed T2, slice thickness, in-plane spacing, lossy compression; "
            "coarse bins). Sensitivity and specificity: counts at each patient's own model threshold, summed over the "
            "sites that sent the level (estimand: the pooled patients of those sites; Wilson 95% CI). AUC: "
            "random-effects summary of the sites' own AUCs in that level (estimand: the typical site; logit scale, "
            "Hartung-Knapp-Sidik-Jonkman CI; k = sites with both classes in the level). Difference vs reference "
            "(the most common level): random-effects meta-regression of the site×level logit AUCs on the level "
            "indicators (Paule-Mandel residual between-site variance, Knapp-Hartung 95% CI and t test), shown on the "
            "AUC scale at the reference level's fitted AUC; negative means a lower AUC than the reference. Youden's "
            "J difference: the same meta-regression on the site×level J = sensitivity + specificity − 1 at each "
            "patient's own model threshold (+0.5 per cell; estimand: the typical site's operating point): a level "
            "whose scores shift keeps its AUC but loses its threshold, and shows here. Intervals and p-values are per "
            "contrast, not adjusted for the number of levels compared: the largest drop is the most extreme of "
            "several (bench/stratified_power.py: with no effect on this cohort's design its interval excludes 0 in "
            "5-7% of federations). A level "
            "with fewer patients at a site than that site's minimum cell count is suppressed there (and so is the "
            "next smallest level, so that it cannot be derived from the total): it is left out of the sums and shown "
            "as suppressed, never estimated.",
        )
    )
    head = ["attribute", "level", "sites", "n (malignant/benign)", "sensitivity", "specificity",
            "AUC (random effects, 95% CI)", "AUC difference vs reference (95% CI)", "p",
            "Youden's J difference vs reference (95% CI), p"]  # fmt: skip
    for key in sorted(strat, key=_registry_rank):
        block = strat[key]
        label = (protocols.get(key) or {}).get("label", key)
        b.append(("h3", f"{label}: by acquisition"))
        b.append(("p", block.get("verdict", "")))
        rows = _stratified_rows(block)
        if rows:
            b.append(("table", head, rows))
        notes = []
        for name, attr in block.get("attributes", {}).items():
            for lv, site in sorted(attr.get("single_site", {}).items()):
                if single_site_text(name, lv, site) not in block.get("verdict", ""):  # said once
                    notes.append(single_site_text(name, lv, site))
            om = (attr.get("contrast") or {}).get("omnibus")
            if om:
                notes.append(
                    f"{attr['label']}: all levels at once, F = {_f(om['f'], 2)} on {om['df1']} and {om['df2']} df, "
                    f"p = {_f(om['p'])}."
                )
        missing = block.get("not_stratified") or {}
        if missing:
            from common.acquisition import ATTRIBUTES

            notes.append(
                "Not stratified: " + "; ".join(f"{ATTRIBUTES.get(n, n)} ({why})" for n, why in missing.items()) + "."
            )
        dropped = block.get("strata_dropped") or {}
        if dropped:
            notes.append(
                "Strata not used (failed the coordinator's checks): "
                + "; ".join(f"{s} ({why})" for s, why in sorted(dropped.items()))
                + "."
            )
        if notes:
            b.append(("p", " ".join(notes)))
    return b


def _eps(x) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return "∞ (no DP)" if x == math.inf else ("–" if x < 0 else f"{x:.3g}")


def _sentence(text) -> str:
    text = str(text or "").strip()
    return text[:1].upper() + text[1:] + ("" if not text or text.endswith(".") else ".")


def _pooled_source(p: dict) -> str:
    pooling = p.get("pooling") or {}
    if pooling.get("pooling") == "secure sum":
        return f"secure sum of {len(pooling.get('participants', []))} sites' exact histograms"
    return "from the sites' histograms with their minimum cell count applied"


def _pooling_blocks(results: dict) -> list[Block]:
    """How each pooled score histogram was formed: secure sum (over whom), or per-site suppressed and why."""
    rows = []
    for name, info in sorted(results.get("units", {}).items()):
        pooling = (info.get("threshold_choice") or {}).get("pooling")
        if pooling:
            rows.append([f"threshold of {name}", *_pooling_row(pooling)])
    for name, p in _protocols(results):
        if p.get("pooling"):
            rows.append([f"{p.get('label', name)}: AUC, ROC, calibration", *_pooling_row(p["pooling"])])
    if not rows:
        return []
    text = (
        "Score histograms (the validation histograms that set each threshold, and the out-of-fold histograms behind "
        "the pooled-histogram AUC, ROC and calibration) are pooled by secure summation where at least three sites "
        "take part: the coordinator learns only the sum of the sites' exact histograms, never one site's "
        "(deploy/DATA_FLOW.md). Thresholds, AUC and ECE are computed from that sum; the curves drawn from it merge "
        "adjacent cells until each holds at least the highest minimum cell count of the participants. Sites that "
        "opt out (privacy.secure_pooling), or summations with fewer than three sites, use each site's histogram with "
        "its minimum cell count applied."
    )
    return [("h2", "How the score histograms were pooled"), ("p", text),
            ("table", ["quantity", "pooling", "sites in the sum", "in the clear or lost (why)"], rows)]  # fmt: skip


def _pooling_row(pooling: dict) -> list[str]:
    others = {**pooling.get("clear_sites", {}), **pooling.get("dropped", {})}
    why = "; ".join(f"{s}: {w}" for s, w in sorted(others.items()))
    if pooling.get("lost"):
        why = f"{why}; {pooling['lost']}" if why else pooling["lost"]
    mode = pooling.get("pooling", "n/a")
    if mode == "secure sum" and pooling.get("attempts", 1) > 1:
        mode += f" (attempt {pooling['attempts']})"
    return [mode, ", ".join(pooling.get("participants", [])) or "–", why or "–"]


def _membership_blocks(results: dict) -> list[Block]:
    """Per-site class counts of the folds and the inner validation split, and the units a site sat out."""
    mem = results.get("membership") or {}
    per_site = mem.get("per_site") or {}
    if not per_site and not mem.get("sat_out"):
        return []
    b: list[Block] = [("h2", "Patient membership and class balance")]
    b.append(
        (
            "p",
            "Each patient's fold and inner-validation membership depend only on its own pseudonym key and the seed, "
            "so adding or removing a patient moves no one else; classes are therefore balanced only in expectation. "
            f"Held-out fold counts per fold (k = {mem.get('k', 'n/a')}) as malignant/benign; inner validation: "
            f"about {mem.get('val_fraction', 'n/a')} of the training patients, here of a model trained on every "
            "patient. A site with no training patient of one class in a unit sits that unit out.",
        )
    )
    rows = []
    for site, c in sorted(per_site.items()):
        folds = " ".join(f"{p}/{n}" for p, n in zip(c["fold-pos"], c["fold-neg"], strict=True))
        rows.append(
            [site, f"{c['all-pos'][2]}/{c['all-neg'][2]}", folds or "–", f"{c['all-pos'][1]}/{c['all-neg'][1]}"]
        )
    if rows:
        b.append(("table", ["site", "malignant/benign", "per held-out fold", "inner validation"], rows))
    sat = [
        [unit, site, why] for unit, r in sorted((mem.get("sat_out") or {}).items()) for site, why in sorted(r.items())
    ]
    if sat:
        b.append(("table", ["unit", "site sat out", "reason"], sat))
    missing = mem.get("no_counts") or {}
    if missing:
        b.append(("p", "No membership counts from: " + "; ".join(f"{s} ({w})" for s, w in sorted(missing.items()))))
    return b


def _privacy_blocks(results: dict) -> list[Block]:
    """Differential privacy: the per-site ε table (what each site reported) and the accuracy-vs-ε sweep."""
    b: list[Block] = []
    priv = results.get("privacy") or {}
    per_site = priv.get("per_site") or {}
    if priv.get("any_dp") or any(p.get("refused_rounds") for p in per_site.values()):
        b.append(("h2", "Differential privacy at the sites"))
        b.append(
            (
                "p",
                "ε as reported by each site in its last DP training reply: the site's whole privacy ledger (every "
                "model ever trained on its data, this run and earlier ones), RDP upper bound at the site's own δ. "
                "Budgets, δ and clipping are the sites' own settings; the coordinator cannot change them. A site "
                "that refused a round (budget spent, or a model it cannot train privately) is listed with its reason; "
                "the rounds went on without it. "
                + _sentence(priv.get("threat_model", ""))
                + " "
                + _sentence(priv.get("unprotected", "")),
            )
        )
        rows = [
            [
                site,
                "yes" if p.get("dp") else "no",
                _eps(p.get("epsilon")) + (f" (δ = {p['delta']:g})" if p.get("delta", -1) > 0 else ""),
                str(p.get("dp_rounds", 0)),
                str(p.get("plain_rounds", 0)),
                str(p.get("refused_rounds", 0)),
                "; ".join(p.get("refusals", [])) or "–",
            ]
            for site, p in sorted(per_site.items())
        ]
        b.append(("table", ["site", "DP", "ε spent", "DP rounds", "non-DP rounds", "refused", "refusal"], rows))
    sweep = results.get("dp_sweep") or {}
    if sweep.get("settings"):
        b.append(("h2", "Accuracy vs privacy budget ε (simulation)"))
        b.append(
            (
                "p",
                f"Each setting is a separate run with fresh privacy ledgers at every site (budget ε per site, "
                f"δ = {sweep.get('delta', 'n/a')}); ε = ∞ is the same experiment without DP. Protocol: "
                f"{sweep.get('protocol', 'n/a')}; model trainable {sweep.get('trainable', 'n/a')}, norm "
                f"{sweep.get('norm', 'n/a')} (BatchNorm frozen under DP). Small sites need large noise: results near "
                "chance are shown as they are. The sweep's sites let one experiment spend the whole budget at any σ "
                "up to 100, to measure what the noise does; 'default site policy' says how many sites with the "
                "default settings (half the budget per experiment, σ at most 10) would refuse that plan instead of "
                "training on noise. Evaluation outputs are not DP-protected.",
            )
        )
        rows = []
        for st in sweep["settings"]:
            m = st.get("pooled") or {}
            eps = st.get("epsilon_spent") or {}
            spent = ", ".join(f"{k} {_eps(v)}" for k, v in sorted(eps.items())) or "–"
            sig = list((st.get("sigma") or {}).values())
            sig_text = (f"{min(sig):.3g}–{max(sig):.3g}" if min(sig) != max(sig) else f"{sig[0]:.3g}") if sig else "–"
            refusing = sum(1 for v in (st.get("default_policy") or {}).values() if v.startswith("refuses"))
            policy = f"{refusing} of {len(st['default_policy'])} sites refuse" if st.get("default_policy") else "–"
            rows.append(
                [
                    _eps(st.get("budget")),
                    st.get("status", "n/a"),
                    _prop(m.get("accuracy")),
                    _prop(m.get("sensitivity")),
                    _prop(m.get("specificity")),
                    fmt_auc(st.get("auc") or {}),
                    spent,
                    sig_text,
                    policy,
                    str(st.get("refused_rounds", 0)),
                ]
            )
        head = ["ε budget", "run", "accuracy", "sensitivity", "specificity", "AUC", "ε spent per site", "σ"]
        head += ["default site policy", "refused"]
        b.append(("table", head, rows))
        site_rows = []
        for st in sweep["settings"]:
            for site, m in sorted((st.get("per_site") or {}).items()):
                site_rows.append(
                    [_eps(st.get("budget")), site, f"{m.get('n', 'n/a')}", _prop(m.get("accuracy")), fmt_auc(m["auc"])]
                )
        if site_rows:
            b.append(("table", ["ε budget", "site", "n", "accuracy", "AUC"], site_rows))
    return b


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + blk[1])
        elif kind == "warn":
            out.append(f"> **{blk[1]}**")
        elif kind == "p":
            out.append(blk[1])
        elif kind == "table":
            head, rows = blk[1], blk[2]
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            out += ["| " + " | ".join(r) + " |" for r in rows]
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})")
        out.append("")
    return "\n".join(out)


def _code(text) -> str:
    """An identifier (hash, tag) shown as inline code; empty stays empty."""
    return f"`{text}`" if text else ""


def _cell(text: str) -> str:
    """A table cell in HTML: inline code (see `_code`) as <code>, everything escaped."""
    if len(text) > 1 and text.startswith("`") and text.endswith("`"):
        return f"<code>{html.escape(text[1:-1])}</code>"
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))  # a level name inside a cell


def to_html(blocks: list[Block], figures: dict[str, str]) -> str:
    e = html.escape
    body = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{e(blk[1])}</{kind}>")
        elif kind == "warn":
            body.append(f'<p class="warn">{e(blk[1]).replace("`", "")}</p>')
        elif kind == "p":
            body.append(f"<p>{e(blk[1]).replace('`', '')}</p>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in blk[1])
            rows = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in blk[2])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif kind == "img":
            body.append(
                f'<figure><img alt="{e(blk[2])}" src="data:image/png;base64,{figures[blk[1]]}">'
                f"<figcaption>{e(blk[2])}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #bbb;padding:.25em .5em;font-size:.9em}.warn{background:#fff3cd;padding:.5em;"
        "font-weight:bold}img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>spinefed report</title><style>{style}</style>'
        f"</head><body>{''.join(body)}</body></html>\n"
    )


def render(results: dict, out: str | Path) -> dict[str, Path]:
    """Write the PNGs, report.md and report.html into `out` from `results` (as stored in results.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads(json.dumps(results, default=float, sort_keys=True))  # exactly what results.json holds
    figures = {}
    for file, fn, _ in FIGURES:
        if fn(results, out / file):
            figures[file] = base64.b64encode((out / file).read_bytes()).decode()
    blocks = build(results, figures)
    (out / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    (out / "report.html").write_text(to_html(blocks, figures), encoding="utf-8")
    return {"md": out / "report.md", "html": out / "report.html", **{f: out / f for f in figures}}


def main(argv: list[str] | None = None) -> int:
    folder = Path((argv or sys.argv[1:])[0])
    render(json.loads((folder / "results.json").read_text()), folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
