"""The virtual hospitals go through `client prepare` as real hospitals would: every patient usable, every stack
canonical, whatever the site's vendor, orientation, transfer syntax or multi-frame storage."""

from __future__ import annotations

import csv

import numpy as np

from common.sitedata import SiteData


def test_every_virtual_site_prepares_without_a_skip(prepared_small_sites):
    _, configs, summaries = prepared_small_sites
    assert len(configs) == 10
    for cfg, summary in zip(configs, summaries):
        assert summary.skipped == 0, (cfg.site, [o.reason for o in summary.outcomes if o.status != "ok"])
        assert summary.ok == len(summary.outcomes) > 0
        assert summary.unreadable_files == 0
        data = SiteData.open(cfg.cache, cfg.site)
        assert len(data) == summary.ok
        for i in range(len(data)):
            stack = data.stack(i)
            assert stack.shape == (6, cfg.preprocess.size, cfg.preprocess.size)
            assert np.isfinite(stack).all()
            # normalised per whole slice: the crop holds tissue, not an empty or saturated field
            assert 0.05 < float(np.median(stack[:3])) < 1.2


def test_manifest_labels_survive_into_the_cache(prepared_small_sites):
    root, configs, _ = prepared_small_sites
    for cfg in configs:
        with cfg.manifest.open(encoding="utf-8") as fh:
            labels = sorted(r["label"].lower() for r in csv.DictReader(fh))
        data = SiteData.open(cfg.cache)
        assert sorted(("malignant" if v == 1 else "benign") for v in data.labels) == labels
