"""openvla_ros.chunk_executor with a fake clock (integer nanoseconds): steps at the period, the
replacement rules (execute_steps, never replaying executed time, out of order, expired), stops
(chunk run out, stale step, input problems, cancel), the safety checks on every step and ACT's
temporal ensembling. No ROS, no model."""
from __future__ import annotations

import math

import numpy as np
import pytest

from openvla_ros.chunk_executor import Chunk, ChunkExecutor, ExecutorConfig, Step, Stop
from openvla_ros.safety import GripperConfig, MotionLimits

MS = 1_000_000
P = 0.1  # step period, s
T0 = 1_000_000 * 1_000 * MS  # an arbitrary clock origin (ns)


def limits(pos=0.05, rot=0.25) -> MotionLimits:
    return MotionLimits((pos,) * 3, (rot,) * 3)


def make(execute_steps=0, max_age_s=1.0, decay=0.0, **kw) -> ChunkExecutor:
    return ChunkExecutor(ExecutorConfig(kw.pop("lim", limits()), kw.pop("grip", GripperConfig()), max_age_s,
                                        execute_steps, decay))


def chunk(stamp_ns, steps=4, seq=0, base=0.0, period_s=P) -> Chunk:
    """Step k of chunk `seq`: x = base + k / 1000 (distinct, inside every limit), gripper 1."""
    a = np.zeros((steps, 7))
    a[:, 0] = base + np.arange(steps) / 1000.0
    a[:, 1] = seq / 1000.0
    a[:, 6] = 1.0
    return Chunk(actions=a, stamp_ns=stamp_ns, period_s=period_s, sequence=seq, normalized=a / 2)


def at(i: float) -> int:
    """The clock at tick i (ticks every P seconds from T0, offset by half a period from stamps)."""
    return T0 + int(round(i * P * 1e9))


def run(ex: ChunkExecutor, ticks) -> list:
    return [ex.tick(at(i)) for i in ticks]


def xs(results) -> list:
    """What each tick did: the executed x (rounded) or 'stop' or None."""
    out = []
    for r in results:
        if isinstance(r, Step):
            out.append(round(float(r.action[0]), 6))
        elif isinstance(r, Stop):
            out.append("stop")
        else:
            out.append(None)
    return out


# -- steps at the period ---------------------------------------------------------------------------
def test_steps_go_out_in_order_one_per_tick_then_one_stop():
    ex = make()
    assert ex.tick(at(0)) is None  # nothing to do, nothing moved: no stop either
    assert ex.offer(chunk(at(0.5)), at(0.6)) is None
    res = run(ex, [1, 2, 3, 4, 5, 6, 7])
    assert xs(res) == [0.0, 0.001, 0.002, 0.003, "stop", None, None]
    steps = [r for r in res if isinstance(r, Step)]
    assert [s.index for s in steps] == [0, 1, 2, 3]
    assert [s.planned_ns for s in steps] == [at(0.5) + k * int(P * 1e9) for k in range(4)]
    assert np.allclose(steps[2].normalized, steps[2].action / 2)
    assert "fully executed" in res[4].reason
    assert ex.counts.values["steps_executed"] == 4 and ex.counts.values["stops"] == 1
    assert ex.counts.values["chunks_completed"] == 1


def test_the_first_chunk_starts_at_step_0_however_late_it_arrives():
    """The robot stood still while the model ran: no step is skipped."""
    ex = make()
    ex.offer(chunk(at(0)), at(3.5))  # 350 ms of latency, robot idle
    assert xs(run(ex, [4, 5])) == [0.0, 0.001]


# -- replacement -----------------------------------------------------------------------------------
def test_a_new_chunk_never_replays_steps_executed_after_its_image():
    """execute_steps=2: A runs 2 steps; B (image taken between A's first and second step) is
    adopted then and starts at its step 2, the steps for the two ticks that already went out."""
    ex = make(execute_steps=2)
    ex.offer(chunk(at(0), seq=1, base=0.1), at(0.2))
    assert xs(run(ex, [1])) == [0.1]
    ex.offer(chunk(at(1.5), seq=2, base=0.2), at(1.6))  # image after the tick at 1
    res = run(ex, [2, 3, 4])
    # tick 2: A's second step (A executed 1 < 2); tick 3: B adopted; B's image is older than the
    # step at tick 2 only, so k0 = 1: B's step 0 (planned for tick 2's time) is skipped.
    assert xs(res) == [0.101, 0.201, 0.202]
    assert [r.chunk.sequence for r in res] == [1, 2, 2]
    assert ex.counts.values["steps_skipped"] == 1 and ex.counts.values["chunks_adopted"] == 2


def test_by_default_the_whole_chunk_runs_before_a_newer_one_replaces_it():
    ex = make()
    ex.offer(chunk(at(0), seq=1, base=0.1, steps=3), at(0.2))
    ex.tick(at(1))
    ex.offer(chunk(at(1.2), seq=2, base=0.2, steps=8), at(1.3))
    res = run(ex, [2, 3, 4, 5])
    # A's 3 steps, then B: 2 steps (ticks 2 and 3) went out after B's image: B starts at step 2
    assert xs(res) == [0.101, 0.102, 0.202, 0.203]


def test_a_newer_pending_chunk_supersedes_an_older_one_and_out_of_order_is_refused():
    ex = make(execute_steps=1)
    ex.offer(chunk(at(0), seq=1, base=0.1), at(0.1))
    ex.tick(at(1))  # A step 0
    assert ex.offer(chunk(at(1.1), seq=2, base=0.2), at(1.2)) is None
    assert ex.offer(chunk(at(1.3), seq=3, base=0.3), at(1.4)) is None  # replaces seq 2 before it ran
    refused = ex.offer(chunk(at(1.2), seq=4, base=0.4), at(1.5))  # image older than seq 3's
    assert refused and "out of order" in refused
    refused = ex.offer(chunk(at(1.3), seq=5, base=0.5), at(1.5))  # same image as seq 3
    assert refused and "out of order" in refused
    res = run(ex, [2])
    assert xs(res) == [0.3] and res[0].chunk.sequence == 3  # k0 = 0: no step after its image
    assert ex.counts.values["chunks_superseded"] == 1 and ex.counts.values["chunks_refused"] == 2


def test_a_chunk_whose_steps_were_all_executed_meanwhile_is_dropped():
    ex = make(execute_steps=0)
    ex.offer(chunk(at(0), seq=1, steps=8), at(0.1))
    assert xs(run(ex, [1])) == [0.0]
    ex.offer(chunk(at(0.5), seq=2, steps=2, base=0.5), at(1.1))
    # seq 2 waits for seq 1's 8 steps (ticks 1..8); 8 steps went out after its image: expired
    res = run(ex, range(2, 10))
    assert xs(res) == [round(k / 1000, 6) for k in range(1, 8)] + ["stop"]
    assert ex.counts.values["chunks_expired"] == 1


# -- stops -----------------------------------------------------------------------------------------
def test_a_stale_step_stops_execution_mid_chunk_once():
    """Staleness of step k is judged from the image stamp plus k periods."""
    ex = make(max_age_s=0.25)
    ex.offer(chunk(at(0), steps=8), at(0.1))
    assert xs(run(ex, [1, 2])) == [0.0, 0.001]  # step 1 planned at 0.1, executed at 0.2: 0.1 s late
    res = ex.tick(at(5))  # the timer stalled: step 2 planned at 0.2 is 0.3 s old
    assert isinstance(res, Stop) and "stale" in res.reason and "step 2" in res.reason
    assert xs(run(ex, [6, 7])) == [None, None]  # once, and the chunk is gone
    assert not ex.executing


def test_steps_stay_fresh_when_their_offset_keeps_up_with_the_clock():
    """A chunk longer than max_age_s runs to its end: each step's own planned time is what ages."""
    ex = make(max_age_s=0.25)
    ex.offer(chunk(at(0), steps=8), at(0.1))
    assert xs(run(ex, range(1, 10))) == [round(k / 1000, 6) for k in range(8)] + ["stop"]


def test_input_problems_and_cancel_stop_once_and_drop_the_chunk():
    ex = make()
    ex.offer(chunk(at(0), steps=8), at(0.1))
    run(ex, [1, 2])
    res = ex.tick(at(3), input_problem="image is 1.2 s old")
    assert isinstance(res, Stop) and res.reason == "image is 1.2 s old"
    assert ex.tick(at(4), input_problem="image is 1.3 s old") is None  # once per episode
    assert ex.tick(at(5)) is None  # the chunk was dropped
    ex.offer(chunk(at(5.5), seq=1, base=0.2), at(5.6))
    assert xs(run(ex, [6])) == [0.2]
    stop = ex.cancel("instruction changed")
    assert isinstance(stop, Stop) and stop.reason == "instruction changed"
    assert ex.cancel("disabled") is None and ex.tick(at(7)) is None
    assert ex.counts.values["stops"] == 2


def test_reset_drops_chunks_and_executed_history_without_a_stop():
    ex = make()
    ex.offer(chunk(at(0), steps=8), at(0.1))
    run(ex, [1, 2, 3])
    ex.reset()
    assert ex.tick(at(4)) is None  # no stop: reset is for when the robot was not moving on our behalf
    ex.offer(chunk(at(2.5), seq=1, base=0.3), at(4.1))  # image older than the steps at 3 (forgotten)
    assert xs(run(ex, [5])) == [0.3]  # starts at step 0


def test_refused_at_offer_nonfinite_zero_stamp_too_old_future_and_bad_shape():
    ex = make(max_age_s=0.5)
    bad = chunk(at(0))
    bad.actions[1, 3] = math.nan
    assert "non-finite" in ex.offer(bad, at(0.1))
    assert "no timestamp" in ex.offer(chunk(0), at(0.1))
    assert "old" in ex.offer(chunk(at(0)), at(6))
    assert "future" in ex.offer(chunk(at(10)), at(0))
    assert "shape" in ex.offer(Chunk(np.zeros(7), at(0), P), at(0.1))
    assert "period" in ex.offer(chunk(at(0), period_s=0.0), at(0.1))
    assert ex.counts.values["chunks_refused"] == 6 and not ex.executing


# -- safety on every step --------------------------------------------------------------------------
def test_every_step_is_clipped_with_the_limits_in_force_and_the_gripper_convention():
    ex = make(lim=limits(pos=0.05), grip=GripperConfig("inverted"))
    c = chunk(at(0), steps=3)
    c.actions[:, 0] = [0.2, -0.2, 0.02]
    ex.offer(c, at(0.1))
    s0 = ex.tick(at(1))
    assert s0.safe.delta_position[0] == pytest.approx(0.05) and s0.safe.clipped
    assert s0.safe.gripper == pytest.approx(0.0) and s0.safe.gripper_raw == pytest.approx(1.0)
    ex.config.limits = limits(pos=0.01)  # runtime parameter change
    s1 = ex.tick(at(2))
    assert s1.safe.delta_position[0] == pytest.approx(-0.01)
    s2 = ex.tick(at(3))
    assert s2.safe.delta_position[0] == pytest.approx(0.01) and s2.action[0] == pytest.approx(0.02)


def test_a_step_the_safety_checks_refuse_stops_and_drops_the_chunk():
    ex = make()
    c = chunk(at(0), steps=4)
    ex.offer(c, at(0.1))
    c.actions[2, 4] = math.inf  # corrupted after the offer: caught at its step
    assert xs(run(ex, [1, 2])) == [0.0, 0.001]
    res = ex.tick(at(3))
    assert isinstance(res, Stop) and "step 2" in res.reason and "safety" in res.reason
    assert ex.tick(at(4)) is None


# -- temporal ensembling (ACT) ---------------------------------------------------------------------
def test_temporal_ensembling_averages_every_chunk_in_play_oldest_weighted_most():
    m = 0.5
    ex = make(decay=m)
    a, b = chunk(at(0), seq=1, base=0.1), chunk(at(1.5), seq=2, base=0.2)
    ex.offer(a, at(0.1))
    s0 = ex.tick(at(1))  # A alone, step 0
    ex.offer(b, at(1.6))
    s1 = ex.tick(at(2))  # A step 1 with B step 0 (no step went out after B's image)
    s2 = ex.tick(at(3))  # A step 2 with B step 1
    w = np.exp(-m * np.arange(2))  # w_0: the oldest chunk (A)
    assert s0.action[0] == pytest.approx(0.1) and s0.contributors == 1
    assert s1.action[0] == pytest.approx((w[0] * 0.101 + w[1] * 0.2) / w.sum())
    assert s1.action[1] == pytest.approx((w[0] * 0.001 + w[1] * 0.002) / w.sum())
    assert s2.action[0] == pytest.approx((w[0] * 0.102 + w[1] * 0.201) / w.sum())
    assert s2.contributors == 2 and s2.chunk.sequence == 2 and s2.index == 1
    assert s2.normalized[0] == pytest.approx(s2.action[0] / 2)
    s3 = ex.tick(at(4))  # A step 3 (its last) with B step 2
    s4 = ex.tick(at(5))  # B alone
    assert s3.contributors == 2 and s4.contributors == 1 and s4.action[0] == pytest.approx(0.203)
    assert isinstance(ex.tick(at(6)), Stop)


def test_config_is_validated():
    for kw in ({"max_age_s": 0.0}, {"execute_steps": -1}, {"ensemble_decay": -0.1}, {"max_age_s": math.inf}):
        with pytest.raises(ValueError):
            ExecutorConfig(limits(), GripperConfig(), **{"max_age_s": 1.0, **kw})
