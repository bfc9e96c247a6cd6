import pytest

from evolora.metrics import (average_incremental, average_performance, backward_transfer, compute_metrics,
                             forgetting_per_task, forward_transfer)

# 3 tasks. Row i = after training task i.
R = [
    [80.0, 30.0, 20.0],
    [60.0, 90.0, 40.0],
    [50.0, 70.0, 95.0],
]
R0 = [25.0, 20.0, 30.0]


def test_ap_is_mean_of_final_row():
    assert average_performance(R) == pytest.approx((50 + 70 + 95) / 3)


def test_avg_is_mean_over_steps_of_seen_task_mean():
    steps = [80.0, (60 + 90) / 2, (50 + 70 + 95) / 3]
    assert average_incremental(R) == pytest.approx(sum(steps) / 3)


def test_bwt():
    assert backward_transfer(R) == pytest.approx(((50 - 80) + (70 - 90)) / 2)


def test_fwt_against_zero_shot():
    assert forward_transfer(R, R0) == pytest.approx(((30 - 20) + (40 - 30)) / 2)


def test_forgetting_uses_best_earlier_accuracy():
    # task 0: best of R[0][0]=80, R[1][0]=60 -> 80 - 50; task 1: best R[1][1]=90 -> 90 - 70
    assert forgetting_per_task(R) == [30.0, 20.0]
    R2 = [[50.0, 0.0], [70.0, 90.0], [65.0, 80.0]]  # improved after a later task, then dropped
    assert forgetting_per_task([row[:2] + [0.0] for row in R2])[0] == pytest.approx(5.0)


def test_missing_entries_make_dependent_metrics_none():
    partial = [[80.0, 30.0, None], [60.0, 90.0, 40.0], [50.0, 70.0, 95.0]]
    m = compute_metrics(partial, R0)
    assert m["AP"] == pytest.approx(215 / 3)
    assert m["BWT"] == pytest.approx(-25.0)
    assert m["FWT"] == pytest.approx(10.0)


def test_joint_run_has_only_ap():
    m = compute_metrics([[70.0, 80.0, 90.0]], R0, continual=False)
    assert m["AP"] == pytest.approx(80.0)
    assert "BWT" not in m and "FWT" not in m
    assert m["zero_shot_mean"] == pytest.approx(25.0)


def test_single_task():
    m = compute_metrics([[70.0]], [10.0])
    assert m["AP"] == 70.0 and m["BWT"] is None and m["FWT"] is None


def test_paired_bootstrap_of_ap():
    from evolora.metrics import paired_ap_bootstrap

    a = {"x": [True, False, True, False], "y": [False] * 6}
    same = paired_ap_bootstrap(a, a)
    assert same["delta_AP"] == 0.0 and same["low"] == same["high"] == 0.0 and same["ahead"] == 0.0
    # task x: +1 example of 4 right (+25 points), task y: +3 of 6 (+50): AP +37.5; no resample behind
    b = {"x": [True, True, True, False], "y": [True, True, True, False, False, False]}
    result = paired_ap_bootstrap(a, b, samples=500)
    assert result["delta_AP"] == pytest.approx(37.5)
    assert 0.0 <= result["low"] < 37.5 < result["high"] <= 100.0 and result["ahead"] > 0.95
    # a mixed difference straddles zero
    c = {"x": [False, True, True, False], "y": [True] + [False] * 5}
    mixed = paired_ap_bootstrap(a, c, samples=500)
    assert mixed["low"] < 0.0 < mixed["high"]
    with pytest.raises(ValueError):
        paired_ap_bootstrap(a, {"x": [True], "y": [False] * 6})
