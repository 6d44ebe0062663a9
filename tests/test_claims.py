"""The claims' statistics (utils/report/claims.py) on constructed replicates with a known answer."""
from __future__ import annotations

import math
import statistics

import pytest

from utils.report.claims import Claim, claim_rows, paired_interval, paper_claims, t_interval, trigger_drop, verdict


def summary(drop_points: float, md: float = 0.6, loss: float = 0.55) -> dict:
    """A run's summary whose trigger drop is ``drop_points`` and whose MD / loss AUROCs are given."""
    return {"err_before_trigger": 0.2, "err_after_trigger": 0.2 + drop_points / 100, "md_auroc_poison_vs_clean": md,
            "detectors": {"loss": {"auroc_poison_vs_clean": loss}}}


REPS = [(b, s) for b in range(5) for s in (20, 21)]
NOISE = {rep: 0.3 * ((i * 7) % 5 - 2) for i, rep in enumerate(REPS)}  # mean 0, deterministic, both signs


def groups(st_drop: float, control_drop: float) -> dict:
    return {"ST": {r: summary(st_drop + NOISE[r]) for r in REPS},
            "ST (trigger alone)": {r: summary(control_drop) for r in REPS}}


CLAIM = Claim("c", "p", "the attack beats the trigger alone by more than 1 point", "ST", trigger_drop,
              "ST (trigger alone)", threshold=1.0)


@pytest.mark.parametrize("st,control,expected", [(5.0, 1.0, "holds"), (2.0, 1.0, "inconclusive"),
                                                 (1.0, 1.0, "does not hold"), (0.0, 3.0, "does not hold")])
def test_a_clear_effect_holds_none_is_inconclusive_or_below_and_a_reversed_one_does_not_hold(st, control, expected):
    iv = paired_interval(CLAIM.effects(groups(st, control)))
    assert iv.replicates == 10 and iv.burn_ins == 5
    assert verdict(iv, CLAIM.threshold) == expected
    assert iv.low < st - control < iv.high


def test_effects_are_paired_by_replicate_and_a_missing_control_drops_the_replicate():
    g = groups(4.0, 1.0)
    del g["ST (trigger alone)"][(2, 21)]
    g["ST (trigger alone)"][(0, 20)] = summary(3.5)  # only (0, 20)'s effect changes
    effects = CLAIM.effects(g)
    assert (2, 21) not in effects and len(effects) == 9
    assert effects[(0, 20)] == pytest.approx(4.0 + NOISE[(0, 20)] - 3.5)
    assert effects[(1, 20)] == pytest.approx(3.0 + NOISE[(1, 20)])


def test_the_interval_is_a_t_interval_over_the_burn_ins_means():
    effects = {(b, s): float(b + (s - 20) * 2) for b in range(4) for s in (20, 21)}  # burn-in means 1, 2, 3, 4
    iv = paired_interval(effects)
    means = [1.0, 2.0, 3.0, 4.0]
    half = 3.182446305284263 * statistics.stdev(means) / 2  # t(0.975, 3), n = 4
    assert (iv.mean, iv.low, iv.high) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    assert iv.method == "t over 4 burn-in means"


def test_with_one_burn_in_the_interval_is_over_the_seeds_and_one_unit_gives_none():
    iv = paired_interval({(0, s): float(s) for s in range(6)})
    assert iv.method == "t over 6 seeds of one burn-in" and iv.burn_ins == 1
    m, lo, hi = t_interval([float(s) for s in range(6)])
    assert (iv.low, iv.high) == pytest.approx((lo, hi))
    assert paired_interval({(0, 1): 2.0}) is None
    assert verdict(None, 0.0) == "not measured"


def test_paper_claims_cover_attack_defences_and_md_against_each_data_level_detector():
    keys = [c.key for c in paper_claims("ST, adaptive attacker λ=10")]
    assert {"attack_vs_trigger_alone", "attack_vs_clean_stream", "dsc_paper_vs_st", "dsc_calibrated_vs_st",
            "at_authors_vs_st", "md_separates", "md_beats_lid", "md_beats_mahalanobis",
            "adaptive_lowers_md"} <= set(keys)
    assert "adaptive_lowers_md" not in [c.key for c in paper_claims(None)]


def test_claim_rows_state_threshold_interval_and_verdict():
    g = groups(5.0, 1.0)
    g["ST"] = {r: {**s, "md_auroc_poison_vs_clean": 0.6 + NOISE[r] / 100} for r, s in g["ST"].items()}
    rows = {r["key"]: r for r in claim_rows(paper_claims(None), g)}
    assert rows["attack_vs_trigger_alone"]["verdict"] == "holds"
    assert rows["attack_vs_trigger_alone"]["threshold"] == "> 1"
    assert rows["md_separates"]["verdict"] == "holds" and math.isclose(rows["md_separates"]["mean"], 0.6)
    assert rows["md_separates"]["threshold"] == "> 0.5" and rows["md_separates"]["effect"] == "0.600 AUROC"
    assert rows["md_beats_loss"]["verdict"] == "holds"  # 0.6 against 0.55 on every replicate (± noise)
    assert rows["md_beats_lid"]["verdict"] == "not measured"  # no lid scores in these summaries
    assert rows["dsc_paper_vs_st"]["verdict"] == "not measured"  # no DSC row


@pytest.mark.parametrize("st,control,expected", [(3.0, 1.0, "holds"), (1.0, 1.0, "inconclusive"),
                                                 (0.0, 2.0, "does not hold")])
def test_against_a_zero_threshold_no_effect_is_inconclusive(st, control, expected):
    zero = Claim("z", "p", "the attack beats the trigger alone", "ST", trigger_drop, "ST (trigger alone)")
    assert verdict(paired_interval(zero.effects(groups(st, control))), zero.threshold) == expected
