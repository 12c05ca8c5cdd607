"""Seed derivation: every seed graff derives from a user's seed comes from here.

A component that draws random numbers gets its generator seeded by a pure function of the
user's ``seed`` and a counter (a decision index, a call count), never by a generator that
carries hidden state: a resumed run replays the draws from the saved counter alone.

A leaf module: it imports nothing from graff.
"""

from __future__ import annotations

#: :math:`\\lfloor 2^{64}/\\varphi \\rfloor`, the golden-ratio increment of splitmix64: adding
#: multiples of it spreads consecutive counters over all 64 bits.
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def splitmix64(seed: int, index: int) -> int:
    """A well-mixed 64-bit seed for draw ``index`` of the stream ``seed``.

    The splitmix64 finaliser of :math:`\\text{seed} + (\\text{index}+1)\\,\\gamma \\bmod 2^{64}`
    (:math:`\\gamma` = :data:`GOLDEN_GAMMA`): nearby ``(seed, index)`` pairs give unrelated
    seeds, and ``index = -1`` is a valid stream position (an initialisation draw).

    Examples:
        >>> splitmix64(0, 0) == splitmix64(0, 0) != splitmix64(0, 1)
        True
        >>> 0 <= splitmix64(2**70, 5) < 2**64
        True
    """
    z = (seed + (index + 1) * GOLDEN_GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_seed(seed: int, calls: int) -> int:
    """Seed of call ``calls`` of a sampling stream: :math:`(\\text{seed}\\,\\gamma + \\text{calls}) \\bmod 2^{63}`.

    The cheap (unmixed) derivation the entropy probe's token subsampling uses; the result fits
    ``torch.Generator.manual_seed``.

    Examples:
        >>> stream_seed(0, 7)
        7
        >>> stream_seed(1, 0) == GOLDEN_GAMMA % 2**63
        True
    """
    return (seed * GOLDEN_GAMMA + calls) % (1 << 63)


def component_seed(seed: int) -> int:
    """The seed a scheduler hands to a probe it builds: ``seed mod 2**31``.

    A scheduler's seed may be any non-negative integer (an OS draw is 56 bits); the probes
    seed ``torch.Generator`` with theirs, so it is folded into a range every generator takes.

    Examples:
        >>> component_seed(5), component_seed(2**31 + 5)
        (5, 5)
    """
    return seed % 2**31
