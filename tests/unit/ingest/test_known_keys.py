"""The edge key cache's store: a dictionary bounded by its size, forgetting the record added longest ago."""

from throttlex.ingest.keys import KeyRecord, KnownKeys


def record(key_id: str, version: int = 1) -> KeyRecord:
    return KeyRecord(key_id=key_id, tenant="acme", version=version)


def test_past_its_size_the_record_added_longest_ago_is_forgotten() -> None:
    known = KnownKeys(3)
    for key_id in ("a", "b", "c"):
        known[key_id] = record(key_id)
    known["a"] = record("a", version=2)  # a newer copy of a held key takes no room
    assert list(known) == ["a", "b", "c"] and known["a"].version == 2
    known["d"] = record("d")
    assert list(known) == ["b", "c", "d"]
    assert known.get("a") is None
