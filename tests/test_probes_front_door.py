"""``graff.probes`` is a front door of its own (its layer is checked in ``tests/test_layers.py``)."""

from __future__ import annotations

import graff.probes


def test_front_door_names_the_probes() -> None:
    from graff.probes import CurvatureProbe, CurvatureStats, EntropyProbe, EntropyStats
    from graff.probes.curvature import CurvatureProbe as Curvature
    from graff.probes.entropy import EntropyProbe as Entropy

    assert (CurvatureProbe, EntropyProbe) == (Curvature, Entropy)
    assert {"CurvatureProbe", "CurvatureStats", "EntropyProbe", "EntropyStats"} == set(
        graff.probes.__all__
    )
    assert CurvatureStats.__name__ == "CurvatureStats"
    assert EntropyStats.__name__ == "EntropyStats"
