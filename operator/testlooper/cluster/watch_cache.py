"""The TestRuns as the operator's own watch last delivered them, read by the decisions instead of
a GET each (cluster/runs.py).

kopf hands every TestRun event to cluster/testrun_handlers.py, which puts its body here
(`seen`) before it asks for a decision. A watch delivers one object's versions in order, so the
last event is the newest version the operator has heard of, but it can be older than a status
patch of our own whose answer came back before its watch event. Hence the rules:

- Our write's answer is noted (`wrote`): until the event of that version arrives, `get` says
  nothing for that TestRun and the caller reads it from the API. So a decision never starts
  from a version older than our own last write of it.
- A decision that did start from a cached copy writes its status patch with that copy's
  resourceVersion as a precondition (kube/api.py `patch_status(..., resource_version=)`): if
  anyone wrote the TestRun since (a spec edit not yet delivered, another replica while this
  one was paused), the write is refused and the decision is made again from a fresh read.
- Admission (the only place that spends a pool's room, and the only caller that creates pods)
  never reads from here: it lists TestRuns and pods itself at every round, and the decisions it
  starts read their TestRun fresh.
- After a start or a restart the cache is empty, and it fills as kopf's first listing arrives;
  what is not in it is read from the API.

It holds at most CAPACITY TestRuns, those whose events came last: a decision is mostly
about a TestRun that just changed, and 5,000 TestRuns held whole would be some 60 MB.
"""

from __future__ import annotations

import collections

CAPACITY = 1000


def _key(body: dict) -> tuple[str, str]:
    metadata = body.get("metadata") or {}
    return metadata.get("namespace", ""), metadata.get("name", "")


def _version(body: dict | None) -> str:
    return ((body or {}).get("metadata") or {}).get("resourceVersion") or ""


class TestRunCache:
    __test__ = False  # not a pytest class, whatever its name says

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._bodies: collections.OrderedDict[tuple[str, str], dict] = collections.OrderedDict()
        # TestRun -> the resourceVersion our last write made, while its event has not come back.
        self._awaited: dict[tuple[str, str], str] = {}
        self.hits = 0
        self.misses = 0

    def seen(self, body: dict) -> None:
        """A watch event's object (not DELETED). It is not copied: nothing may change it."""
        key = _key(body)
        self._bodies[key] = body
        self._bodies.move_to_end(key)
        if self._awaited.get(key) == _version(body):
            del self._awaited[key]
        while len(self._bodies) > self.capacity:
            old, _ = self._bodies.popitem(last=False)
            self._awaited.pop(old, None)

    def gone(self, namespace: str, name: str) -> None:
        self._bodies.pop((namespace, name), None)
        self._awaited.pop((namespace, name), None)

    def wrote(self, namespace: str, name: str, stored: dict | None) -> None:
        """Our write of the TestRun answered with `stored` (None: unknown, as when it is gone):
        the cached copy is not used until the watch brings that version."""
        key = (namespace, name)
        version = _version(stored)
        if version and version == _version(self._bodies.get(key)):
            self._awaited.pop(key, None)  # its event came back first
            return
        self._awaited.pop(key, None)
        self._awaited[key] = version or "?"  # the newest last
        while len(self._awaited) > 2 * self.capacity:  # events that never came (the watch restarted)
            old = next(iter(self._awaited))
            del self._awaited[old]
            self._bodies.pop(old, None)  # so that an older event cannot be taken for it

    def get(self, namespace: str, name: str) -> dict | None:
        """The newest version heard of, when it is no older than our own last write; else None."""
        key = (namespace, name)
        body = self._bodies.get(key)
        if body is None or key in self._awaited:
            self.misses += 1
            return None
        self.hits += 1
        return body

    def __len__(self) -> int:
        return len(self._bodies)
