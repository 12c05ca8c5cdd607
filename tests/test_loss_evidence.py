"""Loss evidence (issue 18's held-out finding): under an adaptive optimizer a healthy loss at the
current LR outweighs a λ̂ that calls that LR unstable; an unhealthy loss, or none, does not.

Controls: the same runs with ``GraffConfig(loss_evidence=False)`` (the λ̂-only guard), which
must cut the LR where the evidence rule holds it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import graff
from graff.errors import GraffTypeError
from graff.planner.peak_search import PeakSearch
from graff.probes.curvature import CurvatureProbe

INFLATED = 1e9  # a λ̂ that puts η·λ̂ ~1e6 above Adam's threshold (young second moments)


def _regression(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1) + 0.01 * torch.randn(64, 1)
    return nn.Linear(8, 1), x, y


def _run(
    optimizer: str,
    evidence: bool | None,
    *,
    lam: float = INFLATED,
    steps: int = 40,
    inflate_from: int = 10,
    loss_scale: float = 1.0,
    pass_loss: bool = True,
    raised: float = 1.0,
    keep_raised_peak: bool = True,
    monkeypatch: pytest.MonkeyPatch,
) -> list[float]:
    """LRs of a constant-prior GRAFF run (no planner) whose λ̂ becomes INFLATED at step
    ``inflate_from``; ``loss_scale`` > 1 makes the loss the scheduler sees grow geometrically
    (an unhealthy loss) from then on. ``raised`` > 1: the peak search has already raised the
    peak to ``raised`` × the user's LR and stopped (otherwise it is off)."""
    model, x, y = _regression()
    params = list(model.parameters())
    opt = (
        torch.optim.AdamW(params, lr=1e-2)
        if optimizer == "adamw"
        else torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    )

    def loss_fn() -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    config = graff.GraffConfig(
        planner=False,
        peak_search=raised > 1.0,
        refresh_allowance=0.0,
        loss_evidence=evidence,
        keep_raised_peak=keep_raised_peak,
    )
    sched = graff.GraffScheduler(
        opt,
        graff.BudgetClock(steps=steps),
        loss_fn=loss_fn,
        prior=graff.BudgetPrior("constant", warmup=0.0),
        config=config,
    )
    if raised > 1.0:  # a search that rose to `raised` and stopped
        sched.peak_search.log_peak, sched.peak_search.searching = math.log(raised), False
    real = CurvatureProbe.lambda_max_safe
    lrs = []
    for t in range(steps):
        if t == inflate_from:
            monkeypatch.setattr(CurvatureProbe, "lambda_max_safe", property(lambda s: lam))
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen = float(loss.detach()) * loss_scale ** max(0, t - inflate_from)
        sched.step(torch.tensor(seen) if pass_loss else None)
        lrs.append(sched.get_last_lr()[0])
    monkeypatch.setattr(CurvatureProbe, "lambda_max_safe", real)
    sched.remove()
    return lrs


def test_a_healthy_loss_keeps_adams_lr_against_an_inflated_lambda(monkeypatch) -> None:
    """Adam, λ̂ inflated ×1e6 while the loss keeps falling: the estimate is set aside and the
    LR stays the user's (default rule); the λ̂-only control cuts it to the clamp."""
    kept = _run("adamw", None, monkeypatch=monkeypatch)
    cut = _run("adamw", False, monkeypatch=monkeypatch)
    assert kept[-1] == pytest.approx(1e-2)
    assert min(kept) == pytest.approx(1e-2)
    assert cut[-1] < 1e-2 * 1e-2


def test_a_plausible_over_estimate_still_cuts_under_a_healthy_loss(monkeypatch) -> None:
    """λ̂ putting η·λ̂ at 2c (within the IMPLAUSIBLE factor) is believed: the guard cuts the
    LR to c/λ̂ = half the user's, loss evidence or not."""
    c = graff.guard.guard_constant(torch.optim.AdamW([nn.Parameter(torch.zeros(1))]))
    lam = 2 * c / 1e-2
    for evidence in (None, False):
        lrs = _run("adamw", evidence, lam=lam, monkeypatch=monkeypatch)
        assert lrs[-1] == pytest.approx(0.5e-2, rel=1e-6)


def test_a_discredited_estimate_stays_aside_until_the_next_one() -> None:
    """Unit: set aside on a healthy step, it stays aside on an unhealthy one, and a new
    estimate (a larger ``n_estimates``) is trusted again; the state round-trips."""
    search = PeakSearch(
        enabled=True, search_fraction=0.15, peak_max=10.0, backoff=3.0, loss_evidence=True
    )
    search.healthy = True
    assert search.discredits(-3.0, 0.0, 1)
    assert not search.discredits(-1.0, 0.0, 2)  # plausible (e^1 < IMPLAUSIBLE): believed
    assert search.discredits(-3.0, 0.0, 2)
    search.healthy = False
    assert search.discredits(-3.0, 0.0, 2)  # an unhealthy step does not restore it
    state = search.state_dict()
    other = PeakSearch(
        enabled=True, search_fraction=0.15, peak_max=10.0, backoff=3.0, loss_evidence=True
    )
    other.load_state_dict(state)
    assert other.discredited == 2
    assert not search.discredits(-3.0, 0.0, 3)  # a new estimate, and no evidence against it
    off = PeakSearch(enabled=True, search_fraction=0.15, peak_max=10.0, backoff=3.0)
    off.healthy = True
    assert not off.discredits(-3.0, 0.0, 1)  # loss evidence off: λ̂ is always believed


def test_an_exploding_loss_lets_the_inflated_lambda_cut(monkeypatch) -> None:
    """The loss the scheduler sees grows ×3 per step after the inflation: the evidence is gone,
    so λ̂ (and the explosion watch) cut the LR far below the user's."""
    lrs = _run("adamw", None, loss_scale=3.0, monkeypatch=monkeypatch)
    assert lrs[-1] < 1e-2 * 1e-2


def test_without_a_loss_there_is_no_evidence(monkeypatch) -> None:
    """``sched.step()`` without a loss: the λ̂-only guard cuts, as before the rule existed."""
    lrs = _run("adamw", None, pass_loss=False, monkeypatch=monkeypatch)
    assert lrs[-1] < 1e-2 * 1e-2


def test_sgd_keeps_the_lambda_only_guard_by_default(monkeypatch) -> None:
    """Plain SGD's λ̂ is the Hessian's own (no preconditioner to inflate it): the default rule
    lets it cut; forcing ``loss_evidence=True`` keeps the LR."""
    assert _run("sgd", None, monkeypatch=monkeypatch)[-1] < 1e-2 * 1e-2
    assert _run("sgd", True, monkeypatch=monkeypatch)[-1] == pytest.approx(1e-2)


def test_the_ceiling_stops_a_rise_but_pulls_a_raised_peak_back_only_without_evidence() -> None:
    """Rule 2 of the peak search: a ceiling below a raised σ pulls it back to
    max(0, ceiling) unless the step's loss was healthy under loss evidence."""
    for pull_back, expected in ((True, 0.0), (False, 1.0)):
        search = PeakSearch(enabled=True, search_fraction=0.15, peak_max=10.0, backoff=3.0)
        search.log_peak, search.searching = 1.0, False
        search.update(0.5, 0.0, False, log_ceiling=-1.0, pull_back=pull_back)
        assert search.log_peak == expected
    search = PeakSearch(enabled=True, search_fraction=0.15, peak_max=10.0, backoff=3.0)
    search.update(0.01, 0.0, False, log_ceiling=-1.0, pull_back=False)
    assert search.log_peak == 0.0  # the ceiling still stops the rise


def _adam_c() -> float:
    return graff.guard.guard_constant(torch.optim.AdamW([nn.Parameter(torch.zeros(1))]))


def test_keep_raised_peak_holds_a_healthy_raised_lr_against_a_plausible_estimate(
    monkeypatch,
) -> None:
    """The search raised the LR to 2× the user's; λ̂ then puts η·λ̂ at 2c there (plausible:
    the adaptive edge of stability at that LR). With ``keep_raised_peak`` and a healthy loss the
    guard keeps 2e-2 (the default); the control without it cuts to c/λ̂ = the user's 1e-2."""
    lam = 2 * _adam_c() / 2e-2
    kept = _run("adamw", None, lam=lam, raised=2.0, monkeypatch=monkeypatch)
    cut = _run("adamw", None, lam=lam, raised=2.0, keep_raised_peak=False, monkeypatch=monkeypatch)
    assert kept[-1] == pytest.approx(2e-2, rel=1e-6)
    assert cut[-1] == pytest.approx(1e-2, rel=1e-6)


def test_keep_raised_peak_never_floors_the_users_own_lr(monkeypatch) -> None:
    """Nothing raised (σ = 0): a plausible over-estimate still cuts the user's LR to c/λ̂."""
    lam = 2 * _adam_c() / 1e-2
    lrs = _run("adamw", None, lam=lam, raised=1.0, monkeypatch=monkeypatch)
    assert lrs[-1] == pytest.approx(0.5e-2, rel=1e-6)


def test_keep_raised_peak_yields_to_an_exploding_loss(monkeypatch) -> None:
    """The loss grows ×3 per step after λ̂ rises: no evidence, so the guard cuts (and the
    explosion watch halves the peak): the LR ends below the user's."""
    lam = 2 * _adam_c() / 2e-2
    lrs = _run(
        "adamw",
        None,
        lam=lam,
        raised=2.0,
        loss_scale=3.0,
        monkeypatch=monkeypatch,
    )
    assert lrs[-1] < 1e-2


def test_guard_floor_closed_form() -> None:
    """Unit: the floor is min(last, prior + σ) only with keep_raised_peak, loss evidence, a
    healthy step and σ > 0; otherwise -inf (no floor)."""

    def search(keep: bool, evidence: bool, healthy: bool, log_peak: float) -> PeakSearch:
        s = PeakSearch(
            enabled=True,
            search_fraction=0.15,
            peak_max=10.0,
            backoff=3.0,
            loss_evidence=evidence,
            keep_raised_peak=keep,
        )
        s.healthy, s.log_peak = healthy, log_peak
        return s

    assert search(True, True, True, 1.0).guard_floor(-0.5, 0.7) == pytest.approx(0.5)
    assert search(True, True, True, 1.0).guard_floor(0.0, 0.7) == pytest.approx(0.7)
    for args in ((False, True, True, 1.0), (True, False, True, 1.0), (True, True, False, 1.0)):
        assert search(*args).guard_floor(0.0, 0.7) == -math.inf
    assert search(True, True, True, 0.0).guard_floor(0.0, 0.7) == -math.inf


@pytest.mark.parametrize("bad", [1, "yes", 0.0])
def test_loss_evidence_must_be_none_or_a_bool(bad: object) -> None:
    with pytest.raises(GraffTypeError, match="loss_evidence"):
        graff.GraffConfig(loss_evidence=bad)
