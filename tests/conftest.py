"""Shared, session-scoped fixtures: small and cheap, generated once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_sites(tmp_path_factory):
    """Ten --small virtual sites (3 patients each, ~100 px matrices), generated once: (root, summaries)."""
    from simulations.datagen import generate

    root = tmp_path_factory.mktemp("sim_small")
    summaries = generate(root, small_=True, seed=7, workers=2)
    return root, summaries
