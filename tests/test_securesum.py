"""Secure summation (common/securesum.py, client/securesum.py): masks cancel, never repeat, and no dropout, late
vector or repeated request lets the coordinator learn one site's input."""

from __future__ import annotations

import numpy as np
import pytest

from client.securesum import SiteSums
from common import securesum as S

SIZE = 200  # [malignant ‖ benign] histograms of 100 bins


def _sites(tmp_path, n: int, run: str = "run-1") -> dict[str, SiteSums]:
    return {f"s{i}": SiteSums(tmp_path / f"s{i}", run) for i in range(n)}


def _spec(sites: dict[str, SiteSums], sum_id: str, nonce: str, names=None) -> dict:
    names = names or list(sites)
    return {"run": "run-1", "id": sum_id, "nonce": nonce, "peers": sorted(S.b64(sites[s].public_key()) for s in names)}


@pytest.mark.parametrize("n", range(3, 11))
def test_masks_cancel_exactly_for_random_vectors(n):
    rng = np.random.default_rng(n)
    keys = [S.new_private_key() for _ in range(n)]
    peers = [S.public_key(k) for k in keys]
    info = S.context("run", "unit/validation", "00" * 16)
    xs = [rng.integers(0, 50, SIZE) for _ in range(n)]
    seeds = [S.new_seed() for _ in range(n)]
    masked = [S.mask(x, k, peers, info, seed) for x, k, seed in zip(xs, keys, seeds, strict=True)]
    assert all(m.dtype == S.DTYPE for m in masked)
    assert np.array_equal(S.unmask(masked, seeds, info).astype(np.int64), np.sum(xs, axis=0))
    # Without every seed, or without every vector, the result is noise rather than the sum.
    assert not np.array_equal(S.unmask(masked[:-1], seeds[:-1], info).astype(np.int64), np.sum(xs[:-1], axis=0))


def test_no_two_masked_vectors_share_a_mask(tmp_path):
    sites = _sites(tmp_path, 3)
    x = np.arange(SIZE) % 4
    masks = []
    for sum_id in ("fold-00/validation", "fold-01/validation"):
        for nonce in ("a" * 32, "b" * 32):
            spec = _spec(sites, sum_id, nonce)
            for site in sites.values():
                site.keep(sum_id, x)
                masks.append(np.frombuffer(site.contribute(spec), dtype=S.DTYPE) - x.astype(S.DTYPE))
    assert len({m.tobytes() for m in masks}) == len(masks) == 12
    # A repeated nonce is refused: the same pairwise masks would cover a second vector.
    with pytest.raises(S.SumRefused, match="nonce was used"):
        sites["s0"].contribute(_spec(sites, "fold-00/validation", "a" * 32))


def test_a_site_checks_the_participants_before_it_sends_anything(tmp_path):
    sites = _sites(tmp_path, 4)
    for site in sites.values():
        site.keep("q", np.ones(SIZE, dtype=int))
    two = _spec(sites, "q", "c" * 32, ["s0", "s1"])
    with pytest.raises(S.SumRefused, match="at least 3"):
        sites["s0"].contribute(two)
    others = _spec(sites, "q", "d" * 32, ["s1", "s2", "s3"])
    with pytest.raises(S.SumRefused, match="does not hold this site's key"):
        sites["s0"].contribute(others)
    twice = _spec(sites, "q", "e" * 32, ["s0", "s1", "s2"])
    twice["peers"].append(twice["peers"][0])
    with pytest.raises(S.SumRefused, match="repeats"):
        sites["s0"].contribute(twice)


def test_a_dropout_never_yields_two_completed_sums_and_a_late_vector_reveals_nothing(tmp_path):
    sites = _sites(tmp_path, 4)
    rng = np.random.default_rng(0)
    xs = {s: rng.integers(0, 5, SIZE) for s in sites}
    for s, site in sites.items():
        site.keep("u/validation", xs[s])
    first = _spec(sites, "u/validation", "1" * 32)
    masked1 = {s: sites[s].contribute(first) for s in ("s0", "s1", "s2")}  # s3 drops out before sending
    # The coordinator cannot finish attempt 1: the sites reveal their seeds only for the full set of participants.
    received = sorted(S.b64(sites[s].public_key()) for s in masked1)
    with pytest.raises(S.SumRefused, match="other sites"):
        sites["s0"].reveal("u/validation", first["nonce"], received)
    # Attempt 2 over the three that answered completes (fresh nonce: fresh masks).
    second = _spec(sites, "u/validation", "2" * 32, ["s0", "s1", "s2"])
    masked2 = {s: np.frombuffer(sites[s].contribute(second), dtype=S.DTYPE) for s in ("s0", "s1", "s2")}
    seeds2 = [sites[s].reveal("u/validation", second["nonce"], second["peers"]) for s in ("s0", "s1", "s2")]
    info2 = S.context("run-1", "u/validation", second["nonce"])
    total = S.unmask(list(masked2.values()), seeds2, info2).astype(np.int64)
    assert np.array_equal(total, xs["s0"] + xs["s1"] + xs["s2"])
    # s3's vector for attempt 1 arrives late: completing attempt 1 needs the others' attempt-1 seeds, which they
    # refuse now (their input is spent on attempt 2), so s3's input is in no completed sum.
    late = sites["s3"].contribute(first)
    for s in ("s0", "s1", "s2"):
        with pytest.raises(S.SumRefused, match="released before"):
            sites[s].reveal("u/validation", first["nonce"], first["peers"])
    # Everything the coordinator holds of attempt 1 with attempt 2's seeds does not give back the four inputs' sum.
    vectors1 = [np.frombuffer(v, dtype=S.DTYPE) for v in [*masked1.values(), late]]
    guess = S.unmask(vectors1, [*seeds2, seeds2[0]], S.context("run-1", "u/validation", first["nonce"]))
    assert not np.array_equal(guess.astype(np.int64), sum(xs.values()))
    # Nor can the spent inputs go out in the clear afterwards (that would difference against the sum).
    with pytest.raises(S.SumRefused, match="released before"):
        sites["s0"].clear("u/validation", 5)
    # s3 never released its input: the clear fallback may send it, after which it never enters a sum.
    assert len(sites["s3"].clear("u/validation", 5)) == SIZE
    third = _spec(sites, "u/validation", "3" * 32, ["s1", "s2", "s3"])
    sites["s3"].contribute(third)
    with pytest.raises(S.SumRefused, match="in the clear"):
        sites["s3"].reveal("u/validation", third["nonce"], third["peers"])


def test_a_resumed_coordinator_may_sum_the_same_input_over_the_same_sites_again_but_nothing_else(tmp_path):
    sites = _sites(tmp_path, 3)
    x = np.full(SIZE, 2)
    for nonce in ("4" * 32, "5" * 32):
        spec = _spec(sites, "u/validation", nonce)
        for site in sites.values():
            site.keep("u/validation", x)
            site.contribute(spec)
        for site in sites.values():
            assert len(site.reveal("u/validation", nonce, spec["peers"])) == S.KEY_BYTES
    sites["s0"].keep("u/validation", x + 1)  # a changed input after the release: never summed again
    with pytest.raises(S.SumRefused, match="changed"):
        sites["s0"].contribute(_spec(sites, "u/validation", "6" * 32))


def test_out_of_range_or_inconsistent_sums_are_refused():
    good = np.concatenate([np.array([3, 1] + [0] * 98), np.array([0, 4] + [0] * 98)]).astype(S.DTYPE)
    hp, hn = S.histogram_sum(good, 4, 4)
    assert hp.sum() == 4 and hn.sum() == 4
    with pytest.raises(S.SumRefused, match="participants counted"):
        S.histogram_sum(good, 5, 4)
    wrapped = good.copy()
    wrapped[:1] -= np.uint32(5)  # a negative contribution wraps to a huge uint32 value
    with pytest.raises(S.SumRefused, match="above the"):
        S.histogram_sum(wrapped, 4, 4)
    with pytest.raises(S.SumRefused, match="bytes"):
        S.decode(b"\x00" * 10, SIZE)
    with pytest.raises(S.SumRefused, match="non-negative integers"):
        S.mask(np.array([-1, 2]), S.new_private_key(), [], b"", S.new_seed())
