"""report.md and report.html are rendered from results.json only: every number in report.md is in results.json."""

from __future__ import annotations

import json
import math
import re

import pytest

from server.report import render

NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])")
pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py: messages need a run identity


def _numbers(obj) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)] if math.isfinite(obj) else []
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _numbers(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in _numbers(x)]
    return []


def assert_numbers_from(md: str, results: dict) -> int:
    values = _numbers(results)
    text = re.sub(r"\]\([^)]*\)", "]", md)  # figure file names
    text = re.sub(r"`[^`]*`", "", text)  # identifiers (hashes, tags) are shown as code, not numbers
    checked = 0
    for token in NUMBER.findall(text):
        decimals = len(token.split(".")[1]) if "." in token else 0
        x = float(token)
        ok = any(round(v, decimals) == round(x, decimals) or round(abs(v), decimals) == abs(x) for v in values)
        assert ok, f"report.md shows {token}, which results.json does not hold"
        checked += 1
    return checked


def test_every_number_in_the_report_is_in_results_json(tmp_path):
    from server.protocols import run_protocol
    from tests.fakes import ClientGrid  # the same tiny run as the protocol tests
    from tests.fakes import protocol_experiment as experiment
    from tests.tinysites import make_site

    data = tmp_path / "data"
    sites = [make_site(data, f"h{i}", n=9, n_malignant=3, seed=i) for i in range(3)]
    exp = experiment("all", plan={"max_folds": 1, "max_held_out": 2, "final_model": False})
    out = tmp_path / "out"
    run_protocol(ClientGrid(sites), exp, out, synthetic=True, quick=True)
    results = json.loads((out / "results.json").read_text())
    md = (out / "report.md").read_text()
    assert assert_numbers_from(md, results) > 30
    assert "Synthetic data" in md and "smoke test" in md and "not evidence" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and 'src="roc.png"' not in html
    assert f"<code>{results['provenance']['evaluation_tag']}</code>" in html and "`" not in html
    # Re-rendering from the file alone gives the same document.
    render(results, out)
    assert (out / "report.md").read_text() == md
