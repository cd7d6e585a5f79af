"""Default seeds (TUNEFORGE_SEED): reproducible, independent of arrival order, off by default."""

from __future__ import annotations

from tuneforge.server.seeds import DefaultSeeds


def test_unset_means_fresh_randomness():
    seeds = DefaultSeeds(None)
    assert seeds.lora() is None and seeds.sample("[1, 2]") is None


def test_the_same_seed_gives_the_same_sequence_and_another_seed_another():
    a, b, c = DefaultSeeds(0), DefaultSeeds(0), DefaultSeeds(1)
    first = [a.lora(), a.lora(), a.sample("p"), a.sample("p"), a.sample("q")]
    assert first == [b.lora(), b.lora(), b.sample("p"), b.sample("p"), b.sample("q")]
    assert len(set(first)) == 5  # every draw differs: clients, repeats of a prompt, prompts
    assert [c.lora(), c.lora()] != first[:2]
    assert all(0 <= s < 2**63 for s in first)


def test_sample_seeds_do_not_depend_on_the_order_prompts_arrive_in():
    a, b = DefaultSeeds(7), DefaultSeeds(7)
    in_order = {p: a.sample(p) for p in ("x", "y", "z")}
    reversed_ = {p: b.sample(p) for p in ("z", "y", "x")}
    assert in_order == reversed_
