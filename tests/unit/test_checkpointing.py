import pytest

from orders_cdc.checkpointing import CheckpointPolicy
from orders_cdc.kcl.protocol import Checkpointer, CheckpointError, KclError
from orders_cdc.pipeline import Outcome, RecordResult


class ScriptedCheckpointer(Checkpointer):
    """Answers each checkpoint with the next scripted error name (None = success)."""

    def __init__(self, *errors):
        self.errors = list(errors)
        self.calls = []

    def checkpoint(self, sequence_number=None, sub_sequence_number=None):
        self.calls.append((sequence_number, sub_sequence_number))
        error = self.errors.pop(0) if self.errors else None
        if error:
            raise CheckpointError(KclError.parse(error), error)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def results(*pairs):
    return [RecordResult(str(seq), 0, outcome) for seq, outcome in pairs]


@pytest.fixture
def clock():
    return Clock()


def policy(clock, **kw):
    return CheckpointPolicy(clock=clock, sleep=lambda s: None, **{"every_records": 3, "every_seconds": 10, **kw})


def test_due_after_n_records(clock):
    p = policy(clock)
    p.observe(results((1, Outcome.DONE), (2, Outcome.DONE)))
    cp = ScriptedCheckpointer()
    assert not p.checkpoint(cp)
    p.observe(results((3, Outcome.SKIPPED)))
    assert p.checkpoint(cp)
    assert cp.calls == [("3", 0)]
    assert p.committed == ("3", 0)


def test_due_after_t_seconds(clock):
    p = policy(clock)
    p.observe(results((1, Outcome.DONE)))
    cp = ScriptedCheckpointer()
    assert not p.checkpoint(cp)
    clock.now = 10.0
    assert p.checkpoint(cp)
    assert cp.calls == [("1", 0)]
    assert not p.checkpoint(cp), "nothing new since the last checkpoint"


def test_dead_lettered_is_settled(clock):
    p = policy(clock, every_records=1)
    p.observe(results((1, Outcome.DEAD_LETTERED), (2, Outcome.DONE)))
    cp = ScriptedCheckpointer()
    p.checkpoint(cp)
    assert cp.calls == [("2", 0)]


def test_never_moves_backwards(clock):
    p = policy(clock, every_records=1)
    p.observe(results((10, Outcome.DONE)))
    p.observe(results((9, Outcome.DONE)))
    cp = ScriptedCheckpointer()
    p.checkpoint(cp)
    assert cp.calls == [("10", 0)]


def test_sequence_numbers_compare_as_integers_not_strings(clock):
    p = policy(clock, every_records=1)
    p.observe(results((9, Outcome.DONE), (10, Outcome.DONE)))
    cp = ScriptedCheckpointer()
    p.checkpoint(cp)
    assert cp.calls == [("10", 0)]


def test_throttling_is_retried(clock):
    p = policy(clock, every_records=1)
    p.observe(results((1, Outcome.DONE)))
    cp = ScriptedCheckpointer("ThrottlingException", "ThrottlingException", None)
    assert p.checkpoint(cp)
    assert cp.calls == [("1", 0)] * 3


@pytest.mark.parametrize("error", ["ShutdownException", "InvalidStateException"])
def test_shutdown_and_invalid_state_stop_checkpointing(clock, error):
    p = policy(clock, every_records=1)
    p.observe(results((1, Outcome.DONE)))
    cp = ScriptedCheckpointer(error)
    assert not p.checkpoint(cp)
    assert p.stopped
    p.observe(results((2, Outcome.DONE)))
    assert not p.checkpoint(cp, force=True)
    assert cp.calls == [("1", 0)]


def test_force_ignores_cadence(clock):
    p = policy(clock, every_records=100)
    p.observe(results((1, Outcome.DONE)))
    cp = ScriptedCheckpointer()
    assert p.checkpoint(cp, force=True)
    assert cp.calls == [("1", 0)]


def test_nothing_to_checkpoint(clock):
    cp = ScriptedCheckpointer()
    assert not policy(clock).checkpoint(cp, force=True)
    assert cp.calls == []
