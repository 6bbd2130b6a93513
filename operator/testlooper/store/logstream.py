"""Runs' logs as capped Redis streams, for the operator's worker API and `testlooper logs [-f]`.

    tl:log:{run_id}        stream of {"offset": N, "data": BYTES}, then one {"end": "1"}
    tl:log:{run_id}:size   how many bytes of the log the stream has taken

A chunk is appended by one Lua script, so appends from any number of API processes keep the
agent's protocol: a chunk sent again adds only the bytes past the stored size (none, usually),
and one that would leave a gap is refused with the size. The stream is capped (about
`max_entries` chunks, oldest dropped first) so a run printing without end costs bounded memory;
a reader that fell behind the cap sees the jump in offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import redis

DEFAULT_MAX_ENTRIES = 4096  # the agent sends 256 KiB chunks: about 1 GiB of a run's latest log
DEFAULT_EXPIRE_SECONDS = 14 * 24 * 3600

_APPEND = """
local size = tonumber(redis.call('GET', KEYS[2]) or '0')
local offset = tonumber(ARGV[1])
if offset > size then return {-1, size} end
local data = ARGV[2]
local fresh = string.sub(data, size - offset + 1)
if #fresh > 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'offset', size, 'data', fresh)
  size = size + #fresh
  redis.call('SET', KEYS[2], size)
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {0, size}
"""


class LogGap(Exception):
    """The chunk starts past the end of the stored log; ``size`` is where it ends."""

    def __init__(self, size: int):
        super().__init__(f"the log holds {size} bytes")
        self.size = size


@dataclass(frozen=True)
class LogChunk:
    entry_id: str  # where to read on from
    offset: int
    data: bytes


class LogStreams:
    def __init__(self, client: redis.Redis, max_entries: int = DEFAULT_MAX_ENTRIES,
                 expire_seconds: int = DEFAULT_EXPIRE_SECONDS):
        self._client = client
        self._append = client.register_script(_APPEND)
        self.max_entries = max_entries
        self.expire_seconds = expire_seconds

    @classmethod
    def from_url(cls, url: str, **kwargs) -> LogStreams:
        return cls(redis.Redis.from_url(url, socket_connect_timeout=5), **kwargs)

    @staticmethod
    def _keys(run_id: str) -> tuple[str, str]:
        stream = "tl:log:" + quote(run_id, safe="")
        return stream, stream + ":size"

    def append(self, run_id: str, offset: int, data: bytes) -> int:
        """Adds the chunk the agent sent at ``offset``; returns the log's size. Raises LogGap."""
        status, size = self._append(keys=self._keys(run_id),
                                    args=[offset, data, self.max_entries, self.expire_seconds])
        if status < 0:
            raise LogGap(int(size))
        return int(size)

    def size(self, run_id: str) -> int:
        return int(self._client.get(self._keys(run_id)[1]) or 0)

    def end(self, run_id: str) -> None:
        """Marks the log complete (the run's RESULT came): followers stop there."""
        stream, size_key = self._keys(run_id)
        with self._client.pipeline() as pipe:
            pipe.xadd(stream, {"end": "1"}, maxlen=self.max_entries, approximate=True)
            pipe.expire(stream, self.expire_seconds)
            pipe.execute()

    def read(self, run_id: str, after: str = "0-0", count: int = 512) -> tuple[list[LogChunk], bool]:
        """The chunks after entry ``after`` (at most ``count``), and whether the log ended there."""
        entries = self._client.xrange(self._keys(run_id)[0], min=f"({after}" if after != "0-0" else "-",
                                      count=count)
        return _chunks(entries)

    def exists(self, run_id: str) -> bool:
        """Whether the run has logged anything (or ended) within the expiry."""
        return bool(self._client.exists(self._keys(run_id)[0]))

    def read_many(self, positions: dict[str, str], block_seconds: float = 0.0,
                  count: int = 512) -> dict[str, tuple[list[LogChunk], bool, str]]:
        """The chunks after each run's entry (``{run_id: after}``), waiting up to
        ``block_seconds`` for one when none is there yet (0: no wait): ``{run_id: (chunks, ended,
        the entry to read on after)}`` for the runs that had news."""
        if not positions:
            return {}
        by_stream = {self._keys(run_id)[0]: run_id for run_id in positions}
        answer = self._client.xread({stream: positions[run_id] for stream, run_id in by_stream.items()},
                                    count=count, block=int(block_seconds * 1000) if block_seconds > 0 else None)
        news = {}
        for stream, entries in answer or ():
            if not entries:
                continue
            run_id = by_stream[stream.decode() if isinstance(stream, bytes) else stream]
            chunks, ended = _chunks(entries)
            news[run_id] = (chunks, ended, entries[-1][0].decode())
        return news

    def follow(self, run_id: str, after: str = "0-0", block_seconds: float = 5.0):
        """Yields chunks as they come until the end marker (a generator for `logs -f`)."""
        stream = self._keys(run_id)[0]
        while True:
            answer = self._client.xread({stream: after}, count=512, block=int(block_seconds * 1000))
            if not answer:
                continue
            chunks, ended = _chunks(answer[0][1])
            for chunk in chunks:
                yield chunk
            after = answer[0][1][-1][0].decode()
            if ended:
                return


def _chunks(entries) -> tuple[list[LogChunk], bool]:
    chunks, ended = [], False
    for entry_id, fields in entries:
        if b"end" in fields:
            ended = True
            break
        chunks.append(LogChunk(entry_id.decode(), int(fields[b"offset"]), fields[b"data"]))
    return chunks, ended
