"""The overview's chart (animus_core/web/throughput.py): minutes counted from the live feed,
seeded from the database, and drawn once for every viewer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

from animus_core.store.console import Change, Minute
from animus_core.web.throughput import HEIGHT, MINUTES, Throughput

NOW = datetime(2026, 12, 3, 12, 30, 20, tzinfo=UTC)


def change(to: str, at: datetime, audit_id: int = 1) -> Change:
    return Change(id=audit_id, work_id=uuid4(), event=to, from_state="running", to_state=to,
                  db_user="engine", at=at, state=to, work_type="t", reason=None)


def test_finished_work_is_counted_by_minute_and_the_dead_of_it() -> None:
    t = Throughput()
    for to in ("completed", "completed", "dead", "running", "queued", "cancelled"):
        t.add(change(to, NOW))
    t.add(change("completed", NOW - timedelta(minutes=1)))
    chart = t.chart(NOW)
    assert len(chart.bars) == MINUTES
    assert (chart.total_finished, chart.total_dead, chart.most_finished) == (5, 1, 4)
    assert chart.bars[-1].title == "12:30: 4 finished, 1 dead"
    assert chart.bars[-2].title == "12:29: 1 finished"
    assert chart.bars[-1].finished == HEIGHT - 4  # the busiest minute is the chart's height
    assert chart.bars[-1].dead == (HEIGHT - 4) / 4
    assert chart.bars[-2].finished == (HEIGHT - 4) / 4
    assert [b.x for b in chart.bars] == sorted(b.x for b in chart.bars)


def test_minutes_older_than_the_hour_are_forgotten() -> None:
    t = Throughput()
    t.add(change("completed", NOW - timedelta(minutes=MINUTES)))
    t.add(change("completed", NOW - timedelta(minutes=MINUTES - 1)))
    assert t.chart(NOW).total_finished == 1


def test_the_seed_replaces_the_minutes_up_to_now_but_what_the_feed_read_after_it() -> None:
    """The console starts mid-minute: that minute's work finished before it started is the
    seed's, what the feed read past the seed's snapshot is the feed's, and no row counts
    twice."""
    t = Throughput()
    t.add(change("completed", NOW - timedelta(minutes=2), audit_id=8))  # the feed, mid-minute
    t.add(change("completed", NOW, audit_id=9))  # read by the feed before the seed came...
    t.add(change("dead", NOW, audit_id=12))  # ...and one after the seed's snapshot
    t.seed([Minute(at=NOW - timedelta(minutes=2), finished=40, dead=3),
            Minute(at=NOW - timedelta(minutes=1), finished=10, dead=0),
            Minute(at=NOW, finished=6, dead=2)], NOW, upto=10)
    t.add(change("completed", NOW, audit_id=10))  # read late: the seed counted it
    t.add(change("completed", NOW, audit_id=13))
    chart = t.chart(NOW)
    assert [b.title for b in chart.bars[-3:]] == ["12:28: 40 finished, 3 dead",
                                                  "12:29: 10 finished", "12:30: 8 finished, 3 dead"]


def test_without_a_seed_the_chart_keeps_what_the_feed_counted() -> None:
    t = Throughput()
    t.add(change("completed", NOW - timedelta(minutes=1), audit_id=3))
    t.add(change("dead", NOW, audit_id=4))
    t.seed([], NOW)  # the database could not be read
    t.add(change("completed", NOW, audit_id=5))
    assert [b.title for b in t.chart(NOW).bars[-2:]] == ["12:29: 1 finished",
                                                         "12:30: 2 finished, 1 dead"]


def test_what_the_seed_counted_the_feed_does_not_count_again() -> None:
    t = Throughput()
    t.seed([Minute(at=NOW - timedelta(minutes=1), finished=5, dead=0)], NOW, upto=50)
    t.add(change("completed", NOW - timedelta(minutes=1), audit_id=50))  # read late: counted
    t.add(change("completed", NOW - timedelta(minutes=1), audit_id=51))  # after the seed
    t.add(change("completed", NOW, audit_id=49))  # the current minute: the seed's too
    t.add(change("completed", NOW, audit_id=52))
    assert [b.title for b in t.chart(NOW).bars[-2:]] == ["12:29: 6 finished",
                                                         "12:30: 1 finished"]


def test_the_depth_holds_between_counts_and_starts_with_the_first() -> None:
    t = Throughput()
    assert t.chart(NOW).depth == ""  # nothing counted yet: no line
    t.depth(10, NOW - timedelta(minutes=5))
    t.depth(0, NOW - timedelta(minutes=2))
    points = [p.split(",") for p in t.chart(NOW).depth.split()]
    assert len(points) == 6  # from the first count on, each minute
    ys = [float(y) for _x, y in points]
    assert ys[:3] == [4.0] * 3  # 10 is the top
    assert ys[3:] == [HEIGHT] * 3  # then 0
    later = NOW + timedelta(hours=2)  # counted long ago: the depth holds still
    assert len(t.chart(later).depth.split()) == MINUTES
