"""`meshd train-draft --time-budget`: durations, and how one budget is split between the run's phases."""

from __future__ import annotations

import pytest

from meshd.cli import main
from training.timebudget import (
    GENERATION_SHARE,
    MIN_REPORT_SECONDS,
    REPORT_SHARE,
    TimeBudget,
    format_duration,
    parse_duration,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("1.5h", 5400), ("45", 45), (" 2M ", 120)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "30x", "1h30", "-5m", "0", "0s", "inf", "h1", "30m garbage"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_format_duration():
    assert [format_duration(s) for s in (0, 45, 750, 3900, 7200)] == ["0s", "45s", "12m30s", "1h05m", "2h00m"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("report", [True, False])
def test_split(report):
    """Generation until 60 %, training until the report's 10 % reserve (or the end without a report)."""
    clock = Clock()
    b = TimeBudget(1000.0, report=report, clock=clock)
    assert b.start == 1000.0 and b.end == 2000.0
    assert b.generation_deadline == 1000.0 + GENERATION_SHARE * 1000
    assert b.training_deadline == (2000.0 - REPORT_SHARE * 1000 if report else 2000.0)
    gen_over, train_over = b.over(b.generation_deadline), b.over(b.training_deadline)
    clock.now = 1599.0
    assert not gen_over() and b.left(b.generation_deadline) == pytest.approx(1.0)
    clock.now = 1600.0
    assert gen_over() and not train_over()
    assert b.report_fits() == report  # 400 s left
    clock.now = b.training_deadline
    assert train_over() and b.left(b.training_deadline) == 0.0
    clock.now = 2000.0 - MIN_REPORT_SECONDS + 1
    assert not b.report_fits() and b.spent() == pytest.approx(1000 - MIN_REPORT_SECONDS + 1)
    clock.now = 3000.0
    assert b.left() == 0.0  # never negative
    text = b.describe()
    assert "16m40s" in text and "generation up to 10m00s (60%)" in text
    assert ("held-out report the last 1m40s" in text) == report and ("no held-out report" in text) != report


def test_the_flag_refuses_a_bad_duration_before_loading_anything(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-draft", "--time-budget", "ten minutes"])
    assert e.value.code == 2 and "expected e.g. 90s, 30m, 2h" in capsys.readouterr().err
