"""Runs' logs as capped Redis streams (store/logstream.py), against a real redis-server."""

from __future__ import annotations

import threading

import pytest
import redis

from redis_server import RedisServer
from testlooper.store.logstream import LogGap, LogStreams


@pytest.fixture(scope="module")
def server():
    running = RedisServer().start()
    yield running
    running.stop()


@pytest.fixture
def streams(server):
    client = redis.Redis.from_url(server.url)
    client.flushdb()
    return LogStreams(client, max_entries=50)


def test_chunks_append_in_order_resends_add_nothing_and_gaps_are_refused(streams):
    assert streams.append("ns.tr.1.1", 0, b"hello ") == 6
    assert streams.append("ns.tr.1.1", 0, b"hello ") == 6  # the agent sent it again
    assert streams.append("ns.tr.1.1", 3, b"lo world") == 11  # overlapping: only the new part is kept
    with pytest.raises(LogGap) as gap:
        streams.append("ns.tr.1.1", 20, b"far")
    assert gap.value.size == 11
    chunks, ended = streams.read("ns.tr.1.1")
    assert b"".join(c.data for c in chunks) == b"hello world" and [c.offset for c in chunks] == [0, 6]
    assert not ended and streams.size("ns.tr.1.1") == 11
    assert streams.read("ns.other.1.1") == ([], False)


def test_binary_chunks_are_kept_byte_for_byte(streams):
    data = bytes(range(256)) * 1000
    assert streams.append("ns.tr.1.1", 0, data) == len(data)
    chunks, _ = streams.read("ns.tr.1.1")
    assert b"".join(c.data for c in chunks) == data


def test_the_stream_is_capped_and_a_reader_sees_where_it_resumes(streams):
    for index in range(500):
        streams.append("ns.tr.1.1", index * 4, b"%04d" % index)
    chunks, _ = streams.read("ns.tr.1.1", count=10_000)
    assert 50 <= len(chunks) < 500  # about max_entries: Redis trims whole nodes
    assert chunks[-1].data == b"0499" and chunks[0].offset == (500 - len(chunks)) * 4
    assert streams.size("ns.tr.1.1") == 2000


def test_many_writers_appending_the_same_chunks_keep_one_copy(streams):
    pieces = [b"%05d\n" % index for index in range(200)]
    streams.max_entries = 10_000

    def writer():
        offset = 0
        for piece in pieces:
            streams.append("ns.tr.1.1", offset, piece)
            offset += len(piece)

    threads = [threading.Thread(target=writer) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    chunks, _ = streams.read("ns.tr.1.1", count=10_000)
    assert b"".join(c.data for c in chunks) == b"".join(pieces)


def test_follow_yields_chunks_as_they_come_and_stops_at_the_end(streams):
    streams.append("ns.tr.1.1", 0, b"first\n")
    seen = []

    def follower():
        seen.extend(chunk.data for chunk in streams.follow("ns.tr.1.1", block_seconds=0.2))

    thread = threading.Thread(target=follower)
    thread.start()
    streams.append("ns.tr.1.1", 6, b"second\n")
    streams.end("ns.tr.1.1")
    thread.join(timeout=10)
    assert not thread.is_alive() and seen == [b"first\n", b"second\n"]
    chunks, ended = streams.read("ns.tr.1.1")
    assert ended and len(chunks) == 2


def test_read_continues_after_an_entry(streams):
    streams.append("ns.tr.1.1", 0, b"a")
    streams.append("ns.tr.1.1", 1, b"b")
    first, _ = streams.read("ns.tr.1.1", count=1)
    rest, _ = streams.read("ns.tr.1.1", after=first[-1].entry_id)
    assert [c.data for c in first + rest] == [b"a", b"b"]
