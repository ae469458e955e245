"""Where the model fails to generalize: results by acquisition attribute, and the warnings a reader must not miss.

Pure functions over the sites' tag reports (client/tasks.acquisition_strata: per attribute and level, counts, confusion
counts at each patient's own threshold, the site's DeLong AUC and variance; levels under the site's minimum cell count
arrive as {"suppressed": 1} only) and the census (acquisition counts per site, −1 where suppressed). No Flower here.

Per attribute with at least two known levels in the federation, per level:
- sensitivity and specificity from the counts summed over the sites that sent the level (Wilson CIs; estimand: the
  patients of those sites pooled); suppressed cells are left out and named;
- AUC: random-effects summary of the sites' own AUCs in that level (common.metrics.meta_aucs, as the headline AUC);
- the difference against the reference level (the most common known level): a random-effects meta-regression of
  the site×level logit AUCs on the level indicators (common.metrics.meta_regression: Paule-Mandel residual τ²,
  Knapp-Hartung CI on k − p df), reported on the AUC scale at the reference level's fitted AUC, with its p-value.
A level that only one site carries is said to be so: its effect cannot be told from that site's effect.

Warnings (results.json `warnings`, top of the report): the worst site under site-held-out against the prediction
interval of the other sites; sites and subgroups with fewer than MIN_MALIGNANT malignant cases; extrapolation, where
a held-out site has an acquisition level that no training site had in its census.
"""

from __future__ import annotations

import json
import math

import numpy as np
from scipy import special, stats

from common import metrics as M
from common.acquisition import ATTRIBUTES, UNKNOWN

NAN = float("nan")
KINDS = ("tenfold", "site-held-out")  # the protocols stratified by acquisition (server/protocol_registry.py names)
# Below this many malignant cases a sensitivity (a site's, a subgroup's) is not estimated usefully: its Wilson
# interval spans more than ~0.45 around 0.8. Stated in the report.
MIN_MALIGNANT = 10
ESTIMAND_COUNTS = "pooled over the patients of the sites that sent the level (suppressed cells left out)"
CONTRAST_METHOD = (
    "random-effects meta-regression of the site×level logit AUCs on the level indicators (reference: the most "
    "common level), Paule-Mandel residual tau^2, Knapp-Hartung CI and t test on k − p df; shown on the AUC scale at "
    "the reference level's fitted AUC"
)


def named(attribute: str, level: str) -> str:
    """'Fat-suppressed T2 = `yes`' (levels as code: a bin such as `3.5-4.5 mm` is a name, not a figure)."""
    return f"{ATTRIBUTES.get(attribute, attribute)} = `{level}`"


def _cells(reports: dict[str, dict], name: str) -> tuple[dict[str, dict[str, dict]], int]:
    """level → site → cell of one attribute, and the highest minimum cell count the sites applied."""
    out: dict[str, dict[str, dict]] = {}
    floor = 0
    for site, rep in sorted(reports.items()):
        strata = rep.get("strata") or {}
        levels = (strata.get("attributes") or {}).get(name)
        if not levels:
            continue
        floor = max(floor, int(strata.get("min-cell", 0)))
        for level, cell in levels.items():
            out.setdefault(level, {})[site] = cell
    return out, floor


def _level_row(cells: dict[str, dict]) -> dict:
    """Counts summed over the sites that sent the level, Wilson proportions, random-effects AUC."""
    shown = {s: c for s, c in cells.items() if not c.get("suppressed") and c["n"] > 0}
    row: dict = {"sites": sorted(shown), "n_sites": len(shown), "site_n": {s: int(c["n"]) for s, c in shown.items()}}
    row["suppressed_sites"] = sorted(s for s, c in cells.items() if c.get("suppressed"))
    # each site's counts in the level, kept so that the operating-point contrast can be derived again from results.json
    row["site_cells"] = {
        s: {k: int(c[k]) for k in ("n-pos", "n-neg", "tp", "fn", "tn", "fp")} for s, c in shown.items()
    }
    totals = {k: int(sum(c[k] for c in shown.values())) for k in ("n", "n-pos", "n-neg", "tp", "fp", "tn", "fn")}
    row.update(n=totals["n"], n_pos=totals["n-pos"], n_neg=totals["n-neg"])
    row["confusion"] = {k: totals[k] for k in ("tp", "fp", "tn", "fn")}
    row["sensitivity"] = M.proportion(totals["tp"], totals["n-pos"]) | {"estimand": ESTIMAND_COUNTS}
    row["specificity"] = M.proportion(totals["tn"], totals["n-neg"]) | {"estimand": ESTIMAND_COUNTS}
    with_auc = {s: c for s, c in shown.items() if c["n-pos"] > 0 and c["n-neg"] > 0 and c["auc"] >= 0}
    row["auc_sites"] = sorted(with_auc)
    if with_auc:
        res = M.meta_aucs(
            [c["auc"] for c in with_auc.values()],
            [c["auc-var"] if c["auc-var"] >= 0 else NAN for c in with_auc.values()],
            [c["n-pos"] for c in with_auc.values()],
            [c["n-neg"] for c in with_auc.values()],
        )
        row["auc"] = {k: res[k] for k in ("estimate", "lo", "hi", "pi_lo", "pi_hi", "k", "method", "estimand")}
    else:
        row["auc"] = {"k": 0, "estimate": NAN, "lo": NAN, "hi": NAN, "method": "n/a: no site with both classes"}
    return row


def _contrasts(levels: dict[str, dict], cells: dict[str, dict[str, dict]], reference: str) -> dict:
    """Meta-regression of the site×level logit AUCs on the level indicators: per non-reference level its difference
    from the reference (AUC scale, CI, p), and the omnibus test over all levels when there are more than two."""
    used = [lv for lv in levels if lv != reference and levels[lv]["auc_sites"]]
    if not levels[reference]["auc_sites"] or not used:
        return {"note": "no AUC in the reference level or in any other level"}
    order = [reference, *used]
    rows = [(lv, s, cells[lv][s]) for lv in order for s in levels[lv]["auc_sites"]]
    aucs = [c["auc"] for _, _, c in rows]
    m = [c["n-pos"] for _, _, c in rows]
    n = [c["n-neg"] for _, _, c in rows]
    centre = M.meta_aucs(aucs, [NAN] * len(rows), m, n)["estimate"]  # the logit transform at the pooled AUC
    y, v = M.logit_auc_rows(aucs, m, n, centre)
    x = np.array([[1.0] + [1.0 if lv == other else 0.0 for other in used] for lv, _, _ in rows])
    fit = M.meta_regression(y, v, x)
    out: dict = {"k": fit["k"], "df": fit["df"], "tau2": fit["tau2"], "method": CONTRAST_METHOD, "levels": {}}
    b0 = fit["coef"][0]
    ref_auc = float(special.expit(b0))
    out["reference_fitted_auc"] = ref_auc
    if fit.get("note"):
        out["note"] = fit["note"]
    for j, lv in enumerate(used, start=1):
        b, lo, hi = fit["coef"][j], fit["lo"][j], fit["hi"][j]

        def auc_diff(t: float) -> float:
            return float(special.expit(b0 + t)) - ref_auc if math.isfinite(t) else NAN

        out["levels"][lv] = {
            "difference": auc_diff(b),
            "lo": auc_diff(lo),
            "hi": auc_diff(hi),
            "p": fit["p_value"][j],
            "logit_difference": b,
            "logit_lo": lo,
            "logit_hi": hi,
        }
    if fit.get("omnibus") and len(used) > 1:
        out["omnibus"] = fit["omnibus"]
    return out


J_METHOD = (
    "random-effects meta-regression of the site×level Youden's J (sensitivity + specificity − 1 at each patient's "
    "own model threshold; proportions with +0.5 per cell) on the level indicators, Paule-Mandel residual tau^2, "
    "Knapp-Hartung CI and t test on k − p df"
)


def _youden(cell: dict) -> tuple[float, float]:
    """A site×level cell's Youden J and its binomial variance, sensitivity and specificity each shrunk by +0.5 per
    cell so that 0/n and n/n keep a variance above 0."""
    sens = (cell["tp"] + 0.5) / (cell["n-pos"] + 1.0)
    spec = (cell["tn"] + 0.5) / (cell["n-neg"] + 1.0)
    return sens + spec - 1.0, sens * (1 - sens) / (cell["n-pos"] + 1.0) + spec * (1 - spec) / (cell["n-neg"] + 1.0)


def operating_contrasts(attr: dict) -> dict:
    """The operating point's counterpart of `_contrasts`: the site×level Youden J regressed on the level indicators,
    each level's difference from the reference on the J scale (CI, p). A model whose scores shift at some scanners
    keeps its ranking (AUC) but loses its threshold: this is where that shows."""
    levels, reference = attr["levels"], attr["reference"]
    if "site_cells" not in levels.get(reference, {}):
        return {"note": "results.json from a release without the sites' cells: no operating-point contrast"}

    def both(lv: str) -> list[tuple[str, dict]]:
        cells = levels[lv].get("site_cells") or {}
        return [(s, c) for s, c in sorted(cells.items()) if c["n-pos"] > 0 and c["n-neg"] > 0]

    used = [lv for lv in levels if lv not in (reference, UNKNOWN) and levels[lv]["n"] and both(lv)]
    if not both(reference) or not used:
        return {"note": "no site with both classes in the reference level or in any other level"}
    rows = [(lv, c) for lv in [reference, *used] for _, c in both(lv)]
    y, v = zip(*(_youden(c) for _, c in rows), strict=True)
    x = np.array([[1.0] + [1.0 if lv == other else 0.0 for other in used] for lv, _ in rows])
    fit = M.meta_regression(y, v, x)
    out: dict = {"k": fit["k"], "df": fit["df"], "tau2": fit["tau2"], "method": J_METHOD, "levels": {}}
    out["reference_fitted_j"] = fit["coef"][0]
    if fit.get("note"):
        out["note"] = fit["note"]
    for j, lv in enumerate(used, start=1):
        out["levels"][lv] = {"difference": fit["coef"][j], "lo": fit["lo"][j], "hi": fit["hi"][j]}
        out["levels"][lv]["p"] = fit["p_value"][j]
    return out


def stratify(reports: dict[str, dict]) -> dict:
    """The stratified block of one protocol from its sites' tag reports (site → client/tasks.tag_report)."""
    block: dict = {"min_malignant": MIN_MALIGNANT, "p_floor": P_FLOOR, "attributes": {}, "not_stratified": {}}
    floors = []
    for name, label in ATTRIBUTES.items():
        cells, floor = _cells(reports, name)
        if not cells:
            block["not_stratified"][name] = "unknown at every site"
            continue
        floors.append(floor)
        known = sorted(lv for lv in cells if lv != UNKNOWN)
        levels = {lv: _level_row(cells[lv]) for lv in sorted(cells)}
        usable = [lv for lv in known if levels[lv]["n"] > 0]
        if len(usable) < 2:
            only = f"only {named(name, usable[0])} known" if usable else "every known level suppressed"
            block["not_stratified"][name] = f"{only} in the federation"
            continue
        reference = max(usable, key=lambda lv: (levels[lv]["n"], lv))
        attr = {"label": label, "reference": reference, "floor": floor, "levels": levels}
        attr["single_site"] = {lv: levels[lv]["sites"][0] for lv in usable if levels[lv]["n_sites"] == 1}
        attr["contrast"] = _contrasts({lv: levels[lv] for lv in usable}, cells, reference)
        block["attributes"][name] = attr
    block["floor"] = max(floors) if floors else 0
    return conclude(block)


def conclude(block: dict) -> dict:
    """The block's conclusions from its per-level rows and contrasts: largest drop, a larger one at a single site,
    confounded levels, verdict (also re-derived for a stored results.json by `python -m server.stratified OUT`)."""
    block.pop("single_site_drop", None)
    block["largest_drop"] = largest_drop(block)
    any_drop = largest_drop(block, multi_site=False)
    if any_drop and block["largest_drop"] and any_drop["difference"] < block["largest_drop"]["difference"]:
        block["single_site_drop"] = any_drop
    block["confounded"] = confounded(block)
    for attr in block["attributes"].values():
        attr["contrast_j"] = operating_contrasts(attr)
    block["largest_j_drop"] = largest_drop(block, key="contrast_j")
    block["verdict"] = verdict(block) + operating_verdict(block)
    return block


def contrasts(block: dict, key: str = "contrast") -> list[dict]:
    """Every level's contrast against its attribute's reference, flat: attribute, level, reference, difference,
    lo, hi, p, the site that carries the level alone (or None) and how many sites carry it. `key`: `contrast` (AUC)
    or `contrast_j` (Youden J at the operating point)."""
    out = []
    for name, attr in block["attributes"].items():
        for lv, c in ((attr.get(key) or {}).get("levels") or {}).items():
            if math.isfinite(c["difference"]):
                entry = {"attribute": name, "level": lv, "reference": attr["reference"], **c}
                entry["single_site"] = attr["single_site"].get(lv)
                entry["n_sites"] = attr["levels"][lv]["n_sites"]
                out.append(entry)
    return out


def largest_drop(block: dict, multi_site: bool = True, key: str = "contrast") -> dict | None:
    """The level with the largest AUC drop against its attribute's reference level, over every attribute. With
    `multi_site`, among levels that at least two sites carry when there are any: a level of one site measures that
    site as much as the attribute, so it is named separately (`single_site_drop`), never as the attribute's effect.
    Levels whose contrast has an interval come first (one without has no residual df: nothing to test)."""
    every = contrasts(block, key)
    tested = [e for e in every if math.isfinite(e["lo"]) and math.isfinite(e["hi"])]  # those with an interval first
    pool = [e for e in tested if e["n_sites"] >= 2] if multi_site else []
    pool = pool or tested or every
    return min(pool, key=lambda e: e["difference"]) if pool else None


def confounded(block: dict) -> list[dict]:
    """Groups of (attribute, level) held by exactly the same patients of the same sites: their effects cannot be told
    apart in these data (e.g. every 3 T scanner also fat-suppresses T2). [{"levels": [[attribute, level], ...],
    "sites": [...]}], levels of different attributes only."""
    groups: dict[str, dict] = {}
    for name, attr in block["attributes"].items():
        for lv, row in attr["levels"].items():
            if lv != attr["reference"] and lv != UNKNOWN and row["n"]:
                key = json.dumps(row["site_n"], sort_keys=True)  # the same number of patients at the same sites
                group = groups.setdefault(key, {"levels": [], "sites": sorted(row["site_n"])})
                group["levels"].append([name, lv])
    return [g for g in groups.values() if len({a for a, _ in g["levels"]}) > 1]


def overlaps(block: dict, name: str, level: str) -> list[tuple[str, str, list[str]]]:
    """Non-reference levels of other attributes that share sites with (name, level) without being the very same
    patients (those are `confounded`): (attribute, level, shared sites)."""
    mine = block["attributes"][name]["levels"][level]["site_n"]
    same = {tuple(x) for g in block.get("confounded") or [] if [name, level] in g["levels"] for x in g["levels"]}
    out = []
    for other, attr in block["attributes"].items():
        for lv, row in attr["levels"].items():
            if other == name or lv in (attr["reference"], UNKNOWN) or (other, lv) in same:
                continue
            common = sorted(set(row["site_n"]) & set(mine))
            if common:
                out.append((other, lv, common))
    return out


def single_site_text(name: str, level: str, site: str) -> str:
    return (
        f"{named(name, level)}: only at 1 site ({site}) — the attribute's effect cannot be told from that site's "
        "effect."
    )


P_FLOOR = 0.001  # p-values below are shown as "< 0.001"


def fmt_p(p) -> str:
    p = float(p)
    return "n/a" if not math.isfinite(p) else (f"< {P_FLOOR}" if p < P_FLOOR else f"{p:.3f}")


def _span(c: dict) -> str:
    return (
        f"{c['difference']:+.3f} (95% CI {c['lo']:+.3f} to {c['hi']:+.3f}; p {'= ' if c['p'] >= P_FLOOR else ''}"
        f"{fmt_p(c['p'])}; random-effects meta-regression of the site×level logit AUCs, Knapp-Hartung interval)"
    )


def verdict(block: dict) -> str:
    """One plain paragraph: the attribute with the largest AUC drop and whether its interval excludes 0."""
    if not block["attributes"]:
        return (
            "No acquisition attribute has two or more known levels in the federation: no stratified results "
            "(attributes are read by `client prepare`; caches prepared before carry none)."
        )
    drop = block.get("largest_drop")
    if not drop or not (math.isfinite(drop["lo"]) and math.isfinite(drop["hi"])):
        return (
            "No test of a difference between acquisition levels: too few site×level AUCs (each level needs sites "
            "with both classes, and one more estimate than parameters)."
        )
    what = f"{named(drop['attribute'], drop['level'])} against `{drop['reference']}`"
    single = (
        " " + single_site_text(drop["attribute"], drop["level"], drop["single_site"]) if drop["single_site"] else ""
    )
    every = [e for e in contrasts(block) if math.isfinite(e["lo"]) and math.isfinite(e["hi"])]
    lower = [e for e in every if e["hi"] < 0 and (e["attribute"], e["level"]) != (drop["attribute"], drop["level"])]
    higher = [e for e in every if e["lo"] > 0]
    lone = block.get("single_site_drop")
    if drop["hi"] < 0:
        text = (
            f"The attribute with the largest drop is {ATTRIBUTES[drop['attribute']]}: AUC difference of {what} "
            f"{_span(drop)}. The interval excludes 0: a lower AUC in this level than in the reference.{single}"
        )
    elif not lower and not higher and not (lone and lone["hi"] < 0):
        text = (
            "No evidence of a difference in AUC between the levels of any acquisition attribute: every level's "
            "interval includes 0 (absence of evidence, not proof of equivalence). "
            + (f"The largest drop was {what}: {_span(drop)}.{single}" if drop["difference"] < 0 else "")
        ).rstrip()
    else:
        text = (
            f"The largest drop, {what} ({_span(drop)}), has an interval that includes 0.{single}"
            if drop["difference"] < 0
            else "No acquisition level carried by two or more sites scored a lower AUC than its reference level."
        )
    if lower:
        text += (
            " Also lower than the reference, with an interval that excludes 0: "
            + "; ".join(
                f"{named(e['attribute'], e['level'])} against `{e['reference']}` ({_span(e)})"
                + (f", only at {e['single_site']}" if e["single_site"] else "")
                for e in lower
            )
            + "."
        )
    if higher:
        text += (
            " Higher than the reference: "
            + "; ".join(f"{named(e['attribute'], e['level'])} against `{e['reference']}` ({_span(e)})" for e in higher)
            + "."
        )
    if lone and not any(e["level"] == lone["level"] and e["attribute"] == lone["attribute"] for e in lower):
        text += (
            f" A larger drop, {named(lone['attribute'], lone['level'])} against `{lone['reference']}` "
            f"({_span(lone)}), is carried by {lone['single_site']} alone: the attribute's effect cannot be told from "
            "that site's effect, so it is not named as the attribute with the largest drop."
        )
    shared = overlaps(block, drop["attribute"], drop["level"])
    if shared:
        text += (
            f" {named(drop['attribute'], drop['level'])} shares sites with "
            + "; ".join(f"{named(a, lv)} ({', '.join(sites)})" for a, lv, sites in shared)
            + ": its effect is told apart from theirs only through the sites they do not share."
        )
    for group in block.get("confounded") or []:
        levels = [named(a, lv) for a, lv in group["levels"]]
        text += (
            f" {', '.join(levels[:-1])} and {levels[-1]} occur in the same patients of the same sites "
            f"({', '.join(group['sites'])}): their effects cannot be told apart."
        )
    return text


def operating_verdict(block: dict) -> str:
    """The verdict's second part: the largest drop in Youden's J (sensitivity + specificity − 1) at the deployed
    thresholds, among levels that two or more sites carry (else any), with the pooled sensitivity and specificity."""
    drop = block.get("largest_j_drop")
    if not drop or drop["difference"] >= 0:
        return ""
    name, lv, ref = drop["attribute"], drop["level"], drop["reference"]
    levels = block["attributes"][name]["levels"]

    def ops(level: str) -> str:
        row = levels[level]
        return f"sensitivity {row['sensitivity']['value']:.2f}, specificity {row['specificity']['value']:.2f}"

    if not (math.isfinite(drop["lo"]) and math.isfinite(drop["hi"])):
        span = f"{drop['difference']:+.3f} (no interval: as many parameters as site×level cells)"
    else:
        span = (
            f"{drop['difference']:+.3f} (95% CI {drop['lo']:+.3f} to {drop['hi']:+.3f}; p "
            f"{'= ' if drop['p'] >= P_FLOOR else ''}{fmt_p(drop['p'])}; random-effects meta-regression of the "
            "site×level J, Knapp-Hartung interval)"
        )
    text = (
        f" At the operating point (each patient's own model threshold), the attribute with the largest drop is "
        f"{ATTRIBUTES[name]}: Youden's J (sensitivity + specificity − 1) of {named(name, lv)} against `{ref}` {span}; "
        f"pooled counts: {ops(lv)} against {ops(ref)}."
    )
    if math.isfinite(drop["hi"]) and drop["hi"] < 0:
        text += " The interval excludes 0: the threshold chosen on the training sites serves this level worse."
    elif math.isfinite(drop["hi"]):
        text += " The interval includes 0."
    if drop["single_site"]:
        text += " " + single_site_text(name, lv, drop["single_site"])
    elif drop["n_sites"] >= 2:
        sites = levels[lv]["sites"]
        text += f" It is carried by {drop['n_sites']} sites ({', '.join(sites)})."
    return text


# ----- warnings -------------------------------------------------------------------------------------------------------
def worst_site_warning(block: dict | None) -> dict | None:
    """The site with the lowest site-held-out AUC, its CI, and whether it lies inside the prediction interval for a
    new site formed from the other sites' AUCs (random effects; leave-that-site-out, so it is not its own yardstick)."""
    per_site = (block or {}).get("per_site") or {}
    rated = {s: m for s, m in per_site.items() if math.isfinite(float(m["auc"].get("value", NAN)))}
    if len(rated) < 2:
        return None
    site = min(rated, key=lambda s: (rated[s]["auc"]["value"], s))
    auc = rated[site]["auc"]
    others = [m for s, m in rated.items() if s != site]
    pi = M.meta_aucs(
        [m["auc"]["value"] for m in others],
        [m["auc"].get("var", NAN) for m in others],
        [m["n_pos"] for m in others],
        [m["n_neg"] for m in others],
    )
    w = {"kind": "worst-site", "site": site, "auc": auc, "k_others": pi["k"], "pi_lo": pi["pi_lo"]}
    w["pi_hi"] = pi["pi_hi"]
    # The prediction interval is for a new site's true AUC; this site's AUC is an estimate from few patients. It is
    # judged against the interval for an *observed* AUC at a site of its size: tau^2 + SE^2 + its own sampling
    # variance (logit scale, the Hanley-McNeil variance at the others' pooled AUC, as the pooling weighs sites).
    m = rated[site]
    y, v = M.logit_auc_rows([auc["value"]], [m["n_pos"]], [m["n_neg"]], pi["estimate"])
    se, tau2 = pi.get("logit_se", NAN), pi.get("tau2", NAN)
    if pi["k"] >= 3 and math.isfinite(se) and math.isfinite(tau2):
        half = float(stats.t.ppf(0.975, pi["k"] - 2)) * math.sqrt(tau2 + se * se + float(v[0]))
        mu = pi["logit_estimate"]
        w["observed_lo"], w["observed_hi"] = float(special.expit(mu - half)), float(special.expit(mu + half))
        w["site_logit"] = float(y[0])
    head = (
        f"Worst site: {site}, site-held-out AUC {auc['value']:.3f} (95% CI {auc['lo']:.3f}–{auc['hi']:.3f}; "
        f"{auc.get('method', 'n/a')})"
    )
    if not (math.isfinite(pi["pi_lo"]) and math.isfinite(pi["pi_hi"])):
        w["position"] = "no interval"
        w["text"] = f"{head}; too few other sites ({pi['k']}) for a prediction interval (it needs at least three)."
        return w
    span = (
        f"the 95% prediction interval for a new site from the other {pi['k']} sites' AUCs "
        f"({pi['pi_lo']:.3f}–{pi['pi_hi']:.3f}; random effects, Hartung-Knapp-Sidik-Jonkman)"
    )
    observed = (
        f"the interval for an AUC measured on a site of its size ({m['n_pos']} malignant, {m['n_neg']} benign: "
        f"{w['observed_lo']:.3f}–{w['observed_hi']:.3f}, the prediction interval widened by the site's own sampling "
        "variance)"
    )
    below, above = w["site_logit"] < math.log(w["observed_lo"] / (1 - w["observed_lo"])), auc["value"] > pi["pi_hi"]
    if below:
        w["position"] = "below"
        w["text"] = (
            f"{head} lies below {span}, and below {observed}: worse than the federation predicts for a new hospital."
        )
    elif auc["value"] < pi["pi_lo"]:
        w["position"] = "below-point"
        w["text"] = (
            f"{head}: its point estimate lies below {span}, but inside {observed}: with this few patients it is "
            "not clearly worse than the federation predicts for a new hospital."
        )
    elif above:
        w["position"] = "above"
        w["text"] = f"{head} lies above {span}."
    else:
        w["position"] = "inside"
        w["text"] = f"{head} lies inside {span}: within what the federation predicts for a new hospital."
    return w


def few_malignant_warnings(protocols: dict, stratified: dict) -> list[dict]:
    """Sites (per protocol) and acquisition subgroups with fewer than MIN_MALIGNANT malignant cases."""
    out = []
    by_counts: dict[str, dict] = {}  # the same sites with the same counts under two protocols: one warning
    for key, block in protocols.items():
        per_site = block.get("per_site") or {}
        few = {s: m["n_pos"] for s, m in sorted(per_site.items()) if m["n_pos"] < MIN_MALIGNANT}
        if not few:
            continue
        same = by_counts.get(json.dumps([few, len(per_site)], sort_keys=True))
        if same is not None:
            same["protocols"].append(key)
            same["labels"].append(block.get("label", key))
            continue
        w = {"kind": "few-malignant", "protocols": [key], "labels": [block.get("label", key)]}
        w.update(min_malignant=MIN_MALIGNANT, n_sites=len(few), of=len(per_site), sites=few)
        by_counts[json.dumps([few, len(per_site)], sort_keys=True)] = w
        out.append(w)
    for w in out:
        listed = ", ".join(f"{s} ({n})" for s, n in w["sites"].items())
        w["text"] = (
            f"{' and '.join(w.pop('labels'))}: too few malignant cases to estimate sensitivity (fewer than "
            f"{MIN_MALIGNANT}) at {w['n_sites']} of {w['of']} sites: {listed}."
        )
    for key, block in stratified.items():
        few = {}
        for name, attr in block.get("attributes", {}).items():
            for lv, row in attr["levels"].items():
                if lv != UNKNOWN and row["n"] and row["n_pos"] < MIN_MALIGNANT:
                    few[f"{name}/{lv}"] = row["n_pos"]
        if few:
            listed = ", ".join(f"{named(*k.split('/', 1))} ({n})" for k, n in few.items())
            label = (protocols.get(key) or {}).get("label", key)
            out.append(
                {
                    "kind": "few-malignant",
                    "protocols": [key],
                    "min_malignant": MIN_MALIGNANT,
                    "subgroups": few,
                    "text": f"{label}, by acquisition: too few malignant cases to estimate sensitivity (fewer than "
                    f"{MIN_MALIGNANT}, summed over sites) in {listed}.",
                }
            )
    return out


def extrapolation_warnings(census: dict[str, dict[str, dict[str, int]]], held_out: dict[str, list[str]]) -> list[dict]:
    """Site-held-out units whose held-out site has a known acquisition level that no training site had.

    `census`: site → attribute → level → count (−1: some, fewer than that site's minimum cell count);
    `held_out`: held-out site → its unit's training sites. A training site that reports no counts for an attribute
    leaves the question open (no claim). Only suppressed counts at the training sites (some, fewer than their floor)
    are worded as thin support, not as extrapolation."""
    out = []
    for site, train in sorted(held_out.items()):
        mine = census.get(site) or {}
        absent, thin = [], []
        for name in ATTRIBUTES:
            for level, count in sorted((mine.get(name) or {}).items()):
                if level == UNKNOWN or count == 0:
                    continue
                at_train = [(census.get(t) or {}).get(name) for t in train]
                if not train or any(c is None for c in at_train):
                    continue
                counts = [c.get(level, 0) for c in at_train]
                if all(c == 0 for c in counts):
                    absent.append((name, level))
                elif all(c <= 0 for c in counts):
                    thin.append((name, level, [t for t, c in zip(train, counts, strict=True) if c < 0]))
        if absent:
            levels = ", ".join(named(n, lv) for n, lv in absent)
            out.append(
                {
                    "kind": "extrapolation",
                    "site": site,
                    "levels": [list(p) for p in absent],
                    "text": f"Extrapolation (site-held-out, {site} held out): no training site had {levels}; the "
                    f"model's figures at {site} rest on acquisitions it never saw.",
                }
            )
        for name, level, sites in thin:
            out.append(
                {
                    "kind": "thin-support",
                    "site": site,
                    "levels": [name, level],
                    "sites": sites,
                    "text": f"Thin support (site-held-out, {site} held out): {named(name, level)} only at "
                    f"{', '.join(sites)} among the training sites, with fewer patients than each site's minimum "
                    "cell count (a suppressed census count).",
                }
            )
    return out


def warnings(results: dict, census: dict[str, dict], held_out: dict[str, list[str]]) -> list[dict]:
    """results.json `warnings`, in the report's order: worst site, extrapolation, too few malignant cases."""
    out = []
    worst = worst_site_warning((results.get("protocols") or {}).get("site-held-out"))
    if worst:
        out.append(worst)
    out += extrapolation_warnings(census, held_out)
    protocols = {k: v for k, v in (results.get("protocols") or {}).items() if k in (results.get("stratified") or {})}
    out += few_malignant_warnings(protocols, results.get("stratified") or {})
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m server.stratified OUT`: re-derive the conclusions of OUT/results.json's stratified blocks and its
    worst-site warning with this release's rules (the sites' figures are kept as they are) and render the report
    again."""
    import sys
    from pathlib import Path

    from common.fileio import atomic_write_json
    from server import report

    folder = Path((argv or sys.argv[1:])[0])
    results = json.loads((folder / "results.json").read_text())
    for block in (results.get("stratified") or {}).values():
        if block.get("attributes"):
            conclude(block)
    if results.get("warnings"):  # the worst-site warning depends only on results.json; the others on the census
        worst = worst_site_warning((results.get("protocols") or {}).get("site-held-out"))
        kept = [w for w in results["warnings"] if w.get("kind") != "worst-site"]
        results["warnings"] = ([worst] if worst else []) + kept
    atomic_write_json(folder / "results.json", results)
    report.render(results, folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
