import pytest

from orders_cdc.checkpointing import CheckpointPolicy
from orders_cdc.consumer import ChangeProcessor
from orders_cdc.deadletter import InMemoryDeadLetterSink
from orders_cdc.kcl.protocol import CheckpointError
from orders_cdc.pipeline import Pipeline
from orders_cdc.routing import Router
from tests.unit.test_checkpointing import ScriptedCheckpointer


def processor():
    pipeline = Pipeline(router=Router([]), ctx=None, dead_letters=InMemoryDeadLetterSink())
    return ChangeProcessor(pipeline, CheckpointPolicy, metrics=False)


@pytest.mark.parametrize("error", ["ShutdownException", "InvalidStateException"])
def test_shard_end_after_the_lease_moved_does_not_kill_the_worker(error):
    cp = ScriptedCheckpointer(error)
    processor().shard_ended(cp)
    assert cp.calls == [(None, None)]


def test_shard_end_throttled_is_retried(monkeypatch):
    monkeypatch.setattr("orders_cdc.consumer.time.sleep", lambda s: None)
    cp = ScriptedCheckpointer("ThrottlingException", None)
    processor().shard_ended(cp)
    assert cp.calls == [(None, None), (None, None)]


def test_shard_end_unknown_error_is_raised():
    with pytest.raises(CheckpointError):
        processor().shard_ended(ScriptedCheckpointer("IllegalArgumentException"))
