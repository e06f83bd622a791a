from animus_core import Created, Merged, NewWorkItem, State


async def test_submit_claim_complete(db):
    created = await db.submit_work(NewWorkItem("t", source="test").dedup_key("k").params({"a": 1}))
    assert isinstance(created, Created)
    merged = await db.submit_work(NewWorkItem("t", source="test").dedup_key("k"))
    assert isinstance(merged, Merged) and merged.canonical_id == created.id
    [claimed] = await db.claim(start=True)
    await db.complete(claimed.lease, {"ok": True})
    item = await db.get_work_item(created.id)
    assert item.state == State.COMPLETED and item.outcome.data == {"ok": True}
