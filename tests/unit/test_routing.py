import pytest

from orders_cdc.change import EventName, decode_kinesis_data
from orders_cdc.routing import Route, Router, transition
from tests.factories import kds_record
import orjson


def change(event, new_status=None, old_status=None, table="Orders"):
    new = {"order_id": "o-1", "status": new_status} if new_status else None
    old = {"order_id": "o-1", "status": old_status} if old_status else None
    return decode_kinesis_data(orjson.dumps(kds_record(event, new=new, old=old, keys={"order_id": "o-1"}, table=table)))


shipped = transition("status", "shipped")


@pytest.mark.parametrize(
    "event, new, old, expected",
    [
        ("MODIFY", "shipped", "processing", True),
        ("MODIFY", "shipped", "shipped", False),  # a re-save is not a transition
        ("MODIFY", "delivered", "shipped", False),
        ("INSERT", "shipped", None, True),  # created already shipped
        ("REMOVE", None, "shipped", False),
    ],
)
def test_transition(event, new, old, expected):
    assert shipped(change(event, new, old)) is expected


def test_transition_from_a_given_value():
    from_processing = transition("status", "shipped", from_="processing")
    assert from_processing(change("MODIFY", "shipped", "processing"))
    assert not from_processing(change("MODIFY", "shipped", "pending"))


def test_router_matches_table_events_and_predicate():
    def h(changes, ctx):
        pass

    router = Router([
        Route("all", "Orders", h),
        Route("removes", "Orders", h, events=frozenset({EventName.REMOVE})),
        Route("shipped", "Orders", h, when=shipped),
        Route("other", "Other", h),
    ])
    assert [r.name for r in router.match(change("MODIFY", "shipped", "processing"))] == ["all", "shipped"]
    assert [r.name for r in router.match(change("REMOVE", None, "shipped"))] == ["all", "removes"]
    assert router.match(change("INSERT", "pending", table="Nope")) == ()


def test_duplicate_route_names_are_refused():
    with pytest.raises(ValueError, match="duplicate route names"):
        Router([Route("a", "T", print), Route("a", "T", print)])
