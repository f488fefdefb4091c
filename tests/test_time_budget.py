"""train.max_minutes: the steps that fit are planned from measured step times, the schedule decays over
them (planned again while a machine speeds up or slows down in the run's first half), the run ends on time
with a final checkpoint, and a resume keeps the plan."""

from __future__ import annotations

import json
import math

import pytest
from test_train_loop import make_distiller

from minidistill.config import ConfigError
from minidistill.training import checkpoint as ckpt
from minidistill.training.config import TrainConfig
from minidistill.training.schedule import lr_factor
from minidistill.training.time_budget import TimeBudget


class FakeClock:
    """``seconds_per_call`` more seconds at every reading: a step (two readings) costs a fixed time."""

    def __init__(self, seconds_per_call: float):
        self.now = 0.0
        self.seconds_per_call = seconds_per_call

    def __call__(self) -> float:
        self.now += self.seconds_per_call
        return self.now


def _train_lrs(run_dir):
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["lr"] for r in records if r["kind"] == "train"]


def test_plan_counts_steps_evaluations_and_the_final_reserve():
    b = TimeBudget(100.0, probe_steps=3, eval_seconds=4.0, checkpoint_seconds=1.0)
    for s in (9.0, 2.0, 2.0):  # the first step (warm-up) is not counted
        b.record_step(s)
    assert b.ready and b.step_seconds == 2.0
    # 100 s - 13 s used - 5 s reserve = 82 s; a step costs 2 s + 4 s / 4 (an evaluation every 4 steps).
    assert b.plan(step=3, elapsed=13.0, max_steps=1000, eval_every=4, save_every=0) == 3 + math.floor(82 / 3.0)
    assert b.plan(step=3, elapsed=13.0, max_steps=10, eval_every=4, save_every=0) == 10
    assert b.plan(step=3, elapsed=99.0, max_steps=10, eval_every=0, save_every=0) == 3
    assert not b.next_step_overruns(92.0) and b.next_step_overruns(93.5)


def test_step_time_is_the_median_of_the_probe_steps_after_the_first():
    """Slow steps right after the warm-up (as measured on the demo: 5.7, 3.7 s, then ~2.9 s) do not shrink the plan."""
    b = TimeBudget(600.0, probe_steps=6)
    for s in (5.3, 5.7, 3.7, 2.9, 3.0, 2.8):
        b.record_step(s)
    assert b.step_seconds == 3.0  # the middle of 2.8 2.9 3.0 3.7 5.7 (the mean would be 3.62)
    b.record_step(2.9)
    assert b.step_seconds == pytest.approx((2.9 + 3.0) / 2)  # an even count: the mean of the middle two
    one = TimeBudget(60.0, probe_steps=1)
    one.record_step(4.0)
    assert one.step_seconds == 4.0


def test_bad_budget_is_refused():
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="train.max_minutes"):
            TrainConfig(max_minutes=bad).validate()


def test_run_ends_within_the_budget_with_the_schedule_fitted(tmp_path):
    # Every clock reading advances 0.5 s; the budget of 0.2 min = 12 s fits far fewer than max_steps=40.
    d = make_distiller(tmp_path / "run", train={"max_steps": 40, "max_minutes": 0.2, "warmup_steps": 1,
                                               "min_lr_ratio": 0.1, "lr": 1e-3})
    d.clock = FakeClock(0.5)
    result = d.run()
    assert result.steps == result.planned_steps < 40
    assert result.stopped_by == "max_steps"  # the plan itself fitted: the guard had nothing to cut
    assert result.seconds <= 12.0
    # The cosine decays over the planned steps: the last step's lr is the floor of a schedule of that length.
    lrs = _train_lrs(tmp_path / "run")
    assert len(lrs) == result.steps
    assert lrs[-1] == pytest.approx(1e-3 * lr_factor(result.steps, max_steps=result.steps, warmup_steps=1))
    assert lrs[-1] == pytest.approx(1e-4)
    assert result.last_checkpoint is not None
    state = ckpt.read_trainer_state(result.last_checkpoint)
    assert state["planned_steps"] == result.steps and state["step"] == result.steps


def test_guard_stops_a_run_whose_steps_slow_down(tmp_path):
    class SlowingClock(FakeClock):
        def __call__(self):
            self.now += self.seconds_per_call
            self.readings = getattr(self, "readings", 0) + 1
            if self.readings > 60:  # past the half of the plan, where the run no longer plans again
                self.seconds_per_call *= 1.15  # the machine gets slower than the plan assumed
            return self.now

    d = make_distiller(tmp_path / "run", train={"max_steps": 40, "max_minutes": 0.5})
    d.clock = SlowingClock(0.2)
    result = d.run()
    assert result.stopped_by == "max_minutes"
    assert result.steps < result.planned_steps
    assert result.last_checkpoint is not None and ckpt.read_trainer_state(result.last_checkpoint)["step"] == result.steps


def test_resume_keeps_the_planned_horizon(tmp_path):
    train = {"max_steps": 40, "max_minutes": 0.5, "save_every": 2, "keep_last": 40, "warmup_steps": 1}
    full = make_distiller(tmp_path / "full", train=train)
    full.clock = FakeClock(0.5)
    ref = full.run()
    assert 4 < ref.planned_steps < 40
    # Resume a copy of the run from a checkpoint written after the plan was made.
    states = {p: ckpt.read_trainer_state(p) for p in sorted((tmp_path / "full" / "checkpoints").glob("step-*"))}
    middle = next(p for p, st in states.items() if st["planned_steps"] is not None and st["step"] < ref.steps)
    assert states[middle]["planned_steps"] == ref.planned_steps
    resumed = make_distiller(tmp_path / "full", train={**train, "max_minutes": 0.5})
    resumed.clock = FakeClock(0.5)
    lrs_before = _train_lrs(tmp_path / "full")
    out = resumed.run(resume=middle)
    assert out.planned_steps == ref.planned_steps
    assert out.steps == ref.steps
    assert _train_lrs(tmp_path / "full") == pytest.approx(lrs_before)


def test_a_run_plans_again_when_its_steps_speed_up_and_still_ends_on_time(tmp_path, caplog):
    """The first steps run at 1 s a clock reading, then 0.4 s: the first plan is too short, the run plans again
    every time_probe_steps steps during its first half, fills the budget and still decays to the floor."""

    class SpeedingClock(FakeClock):
        def __call__(self):
            self.readings = getattr(self, "readings", 0) + 1
            if self.readings == 25:
                self.seconds_per_call = 0.4
            return super().__call__()

    caplog.set_level("INFO", logger="minidistill.training.loop")
    train = {"max_steps": 400, "max_minutes": 3.0, "time_probe_steps": 3, "warmup_steps": 1, "min_lr_ratio": 0.1,
             "lr": 1e-3}
    d = make_distiller(tmp_path / "run", train=train, eval={"every": 0})
    d.clock = SpeedingClock(1.0)
    result = d.run()
    plans = [int(r.getMessage().split(" step(s) fit")[0].rsplit(" ", 1)[1]) for r in caplog.records if "step(s) fit" in r.getMessage()]
    assert len(plans) >= 2 and plans[-1] > 1.3 * plans[0], plans
    assert result.planned_steps == plans[-1] and result.steps >= 0.95 * plans[-1]
    assert 0.85 * 180.0 <= result.seconds <= 180.0
    lrs = _train_lrs(tmp_path / "run")
    assert lrs[-1] == pytest.approx(1e-3 * lr_factor(result.steps, max_steps=result.planned_steps, warmup_steps=1))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)  # decayed to (about) the floor over the final plan
