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


@pytest.fixture(scope="session")
def prepared_small_sites(small_sites):
    """The ten small virtual sites with their caches prepared once by `client prepare`'s pipeline:
    (root, [SiteConfig], [PrepareSummary]). Tests that change a cache must copy it first."""
    from common.config import load_site_config
    from common.prepare import prepare

    root, _ = small_sites
    configs = [load_site_config(p) for p in sorted(root.glob("*/site.yaml"))]
    summaries = [prepare(cfg, workers=1) for cfg in configs]
    return root, configs, summaries


@pytest.fixture
def task_identity():
    """Instruction messages take their run/task identity from the process, as inside a ServerApp run (tests that
    build Flower Messages outside one use it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
