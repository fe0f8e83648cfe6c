"""``benchmarks/replay_speed.py``: a user project's ``Trainer.fit`` of at least 1,000 LM
calls, recorded once against the simulator through the ``afnio_pytest`` plugin, replays
with every socket refused (an independent ``sitecustomize.py``), to the same prompt,
history and cost, in under 10 s (a generous bound: the expected figure is 1-2 s).

The full size (168 + 168 messages x 3 epochs, about 1,300 calls) records in about
10 s and is the default. ``AFNIO_REPLAY_TRAIN``, ``AFNIO_REPLAY_VAL`` and
``AFNIO_REPLAY_EPOCHS`` shrink it on a slow machine; the 1,000-call assertion then
applies only when the size still makes 1,000 forward calls.
``python benchmarks/replay_speed.py`` always runs the full size."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._helpers import env_int, load_script

pytest.importorskip("pytest_recording", reason="needs the pytest extra")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "replay_speed.py"


@pytest.fixture(scope="module")
def bench():
    yield from load_script(SCRIPT, "replay_speed_bench")


def test_a_recorded_1000_call_fit_replays_offline_in_under_10_s(
    bench, tmp_path: Path
) -> None:
    train = env_int("AFNIO_REPLAY_TRAIN", bench.DEFAULT_TRAIN)
    val = env_int("AFNIO_REPLAY_VAL", bench.DEFAULT_VAL)
    epochs = env_int("AFNIO_REPLAY_EPOCHS", bench.DEFAULT_EPOCHS)
    result = bench.measure(tmp_path, train, val, epochs)
    print(bench.summary(result))
    forward = (train + val) * epochs
    assert result.interactions > forward  # forward, backward and optimizer calls
    if forward >= bench.TARGET_CALLS:
        assert result.interactions >= bench.TARGET_CALLS
    assert result.blocked == []  # nothing tried the network in the replay
    assert result.same_result  # the recorded prompt, history and cost
    assert result.replay_fit_s < bench.TARGET_S, bench.summary(result)


def test_the_verdict_needs_every_condition(bench) -> None:
    good = bench.ReplaySpeed(
        train=168,
        val=168,
        epochs=3,
        interactions=1340,
        record_s=9.0,
        replay_fit_s=1.8,
        replay_process_s=6.0,
        blocked=[],
        same_result=True,
    )
    assert good.met and "met" in bench.summary(good)
    assert "1340 LM calls in 1.80 s" in bench.summary(good)
    for change in (
        {"replay_fit_s": 12.0},
        {"interactions": 999},
        {"blocked": ["127.0.0.1:9"]},
        {"same_result": False},
    ):
        bad = bench.ReplaySpeed(**{**good.__dict__, **change})
        assert not bad.met, change
        assert "MISSED" in bench.summary(bad)


def test_sizes_below_one_are_refused(bench) -> None:
    for flag in ("--train", "--val", "--epochs"):
        with pytest.raises(SystemExit):
            bench.main([flag, "0"])
