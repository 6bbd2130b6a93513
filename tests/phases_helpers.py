"""Building TestRuns and observations for the phase machine's tests, and persisting its
decisions as the API server would (a JSON merge patch of the status)."""

from __future__ import annotations

from testlooper.decisions.phases import Observations, PodObservation, decide, format_time, merged

T0 = 1_800_000_000.0


def pool(name="p", **spec):
    return {"metadata": {"name": name}, "spec": {"provider": "kubernetes", **spec}}


def a_testrun(runs=1, kind="test", definition=None, status=None, name="t", created=T0, annotations=None, **spec):
    return {
        "metadata": {"name": name, "namespace": "ns", "creationTimestamp": format_time(created),
                     "annotations": dict(annotations or {})},
        "spec": {"repo": "r", "commit": "0" * 40, "task": name, "kind": kind, "runs": runs,
                 "definition": dict(definition or {}), **spec},
        "status": dict(status or {}),
    }


def running_pod(run, attempt=1, at=T0, **fields):
    return PodObservation(run, attempt, "Running", created=at, started=at, running_since=at, **fields)


class Driver:
    """One TestRun, its persisted status, and the decisions taken on it."""

    def __init__(self, obj, pools=None):
        self.obj = obj
        self.pools = list(pools) if pools is not None else [pool()]
        self.decisions = []

    @property
    def status(self):
        return self.obj["status"]

    def decide(self, now=T0, **observed):
        observed.setdefault("pools", self.pools)
        decision = decide(self.obj, Observations(now=now, **observed))
        self.obj["status"] = merged(self.obj["status"], decision.status_patch)
        self.decisions.append(decision)
        return decision


def kinds(actions):
    return [type(action).__name__ for action in actions]
