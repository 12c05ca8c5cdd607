"""graff._seeding: the one place seeds are derived, checked against splitmix64's reference."""

from __future__ import annotations

import torch

from graff._seeding import GOLDEN_GAMMA, component_seed, splitmix64, stream_seed
from graff.schedulers.reactor_policy import standard_normal

# The reference sequence of splitmix64 seeded with 1234567 (Rosetta Code, "Pseudo-random
# numbers/Splitmix64"), i.e. the outputs of Vigna's splitmix64.c.
REFERENCE_1234567 = [
    6457827717110365317,
    3203168211198807973,
    9817491932198370423,
    4593380528125082431,
    16408922859458223821,
]


def test_splitmix64_matches_the_reference_sequence():
    assert [splitmix64(1234567, i) for i in range(5)] == REFERENCE_1234567


def test_splitmix64_takes_any_seed_and_stays_in_64_bits():
    for seed in (0, 2**56 - 1, 2**64, 10**30):
        for index in (-1, 0, 10**6):
            assert 0 <= splitmix64(seed, index) < 2**64


def test_derived_seeds_fit_a_torch_generator():
    for seed in (0, 2**56 - 1, 10**30):
        torch.Generator().manual_seed(stream_seed(seed, 2**40))
        torch.Generator().manual_seed(splitmix64(seed, 3))
        assert 0 <= component_seed(seed) < 2**31
    assert stream_seed(3, 5) == (3 * GOLDEN_GAMMA + 5) % 2**63


def test_reactor_draws_depend_only_on_seed_and_decision():
    """A draw is reproducible from (seed, k) alone: neither the call order nor global RNG matter."""
    first = [standard_normal(7, k) for k in range(4)]
    torch.manual_seed(123)
    backwards = [standard_normal(7, k) for k in reversed(range(4))][::-1]
    assert first == backwards
    assert len(set(first)) == 4
    assert standard_normal(8, 0) != first[0]
