"""What a poll of one Repo decides, from what the shell observed: which TestRuns to create, which
to cancel and delete, which Events to emit, and the Repo's new status.

The shell (cluster/repo_handlers.py) fetches the mirror, resolves and plans each new head, lists
the Repo's TestRuns and asks git which of their commits are still reachable; `decide_poll` turns
that into actions. A TestRun is named by (repo, commit, task) (kube/objects.py), so applying
the same decision twice (a retry, a restart) creates nothing twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from typing import Iterable

from testlooper.planning import match_glob

ENDED_PHASES = frozenset({"Succeeded", "Failed", "Error", "Cancelled"})
RUNNING_COUNTS_AS = "running"  # a TestRun not ended yet, whatever its phase


@dataclasses.dataclass(frozen=True)
class ExistingTestRun:
    """A TestRun of this Repo as listed from the API."""

    name: str
    commit: str
    task: str
    hash: str
    phase: str  # "" before anything wrote its status
    result: str
    cancel: bool
    created: str  # metadata.creationTimestamp (RFC 3339 sorts as time)
    result_from_commit: str = ""
    result_from_testrun: str = ""

    @property
    def ended(self) -> bool:
        return self.phase in ENDED_PHASES

    @property
    def cancelled(self) -> bool:
        """Asked to cancel, or cancelled: it will never give this commit a result."""
        return self.cancel or self.result == "cancelled"


@dataclasses.dataclass(frozen=True)
class PlannedTask:
    """One task of a commit's plan, with the resolved definition it runs."""

    name: str
    kind: str  # build | test
    runs: int
    hash: str
    depends_on: tuple[str, ...]  # task names of this commit's builds it consumes
    definition: dict


@dataclasses.dataclass(frozen=True)
class HeadObservation:
    """A branch head that is new since the last poll, and what reading it gave."""

    branch: str
    commit: str
    tasks: tuple[PlannedTask, ...] = ()
    reason: str = ""  # the planner's words for why these tasks run
    error: str = ""  # one line: the definitions (or planning) error that made the commit untestable
    no_definitions: bool = False
    warnings: tuple[str, ...] = ()  # FILE:LINE:COL: what works but is probably a mistake


@dataclasses.dataclass(frozen=True)
class PollObservations:
    heads: dict[str, str]  # every branch of the remote -> sha (after the fetch)
    new_heads: tuple[HeadObservation, ...]  # for branches matching spec.branches whose head moved
    testruns: tuple[ExistingTestRun, ...]
    reachable_commits: frozenset[str]  # commits of unended TestRuns that a tested head still contains
    now: str  # RFC 3339


@dataclasses.dataclass(frozen=True)
class TestRunToCreate:
    commit: str
    branch: str
    task: PlannedTask
    reused_from: ExistingTestRun | None  # the passed TestRun of an earlier commit with the same hash


@dataclasses.dataclass
class PollDecision:
    create: list[TestRunToCreate]
    cancel: list[str]  # TestRun names
    delete: list[str]  # TestRun names, past retention
    events: list[tuple[str, str, str]]  # (type Normal|Warning, reason, message)
    conditions: list[tuple[str, str, str, str]]  # (type, status, reason, message)
    branches: list[dict]  # status.branches
    branches_summary: str
    # TestRun names to delete before `create` makes them again: cancelled TestRuns of a commit
    # that is a tested head once more (a force push undone, a deleted branch restored).
    replace: list[str] = dataclasses.field(default_factory=list)


def run_content_hash(definition_hash: str, source_tree: str) -> str:
    """What a TestRun's result depends on: the task's resolved definition (its hash covers the
    environment, the commands and its inputs' hashes) and the commit's source tree, which every
    task sees at TEST_SRC_DIR. Two commits share a result only when both are equal, as for an
    empty commit, a revert to a tested tree or a rebase that changed nothing."""
    return hashlib.sha256(f"testlooper-run-v1\0{definition_hash}\0{source_tree}".encode()).hexdigest()


GIT_HOSTS_ANNOTATION = "testlooper.dev/git-hosts"
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def credentials_refusal(secret_name: str, annotations: dict, url: str) -> str:
    """Why the Secret's credentials may not be sent to `url`, or "" when they may.

    Whoever may create a Repo could otherwise name any Secret of the namespace and point `url`
    at a host of theirs: git would hand it the token. So a Secret says where its credentials
    may go (annotation testlooper.dev/git-hosts: comma-separated host names), and they never
    travel over plain http to another machine.
    """
    from testlooper.repos.urls import url_host, url_scheme

    host, scheme = url_host(url), url_scheme(url)
    if not host:
        return ""  # file:// or a path: nothing is sent anywhere
    allowed = {h.strip().lower() for h in str(annotations.get(GIT_HOSTS_ANNOTATION, "")).split(",") if h.strip()}
    if host not in allowed:
        named = ", ".join(sorted(allowed)) if allowed else "none"
        return (f"credentials Secret {secret_name!r} may be sent only to the hosts its annotation "
                f"{GIT_HOSTS_ANNOTATION} names ({named}), not to {host}")
    if scheme in ("http", "git") and host not in LOOPBACK_HOSTS:
        return f"credentials are sent over https or ssh only, not over {scheme}:// to {host}"
    return ""


def tested_branches(globs: Iterable[str], heads: dict[str, str]) -> dict[str, str]:
    """The branches of `heads` that any of `globs` matches (shell globs, `*` matching `/`)."""
    globs = list(globs)
    return {name: sha for name, sha in sorted(heads.items()) if any(match_glob(g, name) for g in globs)}


def moved_heads(tested: dict[str, str], previous_branches: list[dict]) -> dict[str, str]:
    """Tested branches whose head the last poll did not process, or could not read: an error
    may pass without a push (a pinned repository's commit fetched since, a file readable again)."""
    processed = {entry.get("name"): entry.get("commit") for entry in previous_branches or [] if not entry.get("error")}
    return {name: sha for name, sha in tested.items() if processed.get(name) != sha}


def decide_poll(spec: dict, previous_status: dict, observed: PollObservations) -> PollDecision:
    """The actions and status of one successful poll (the fetch worked)."""
    tested = tested_branches(spec.get("branches") or ["main"], observed.heads)
    existing_by_commit_task = {(run.commit, run.task): run for run in observed.testruns}
    passed_by_hash = _passed_by_hash(observed.testruns)
    previous_branches = {entry.get("name"): entry for entry in previous_status.get("branches") or []}
    previous_heads = {name: entry.get("commit") for name, entry in previous_branches.items()}

    create: list[TestRunToCreate] = []
    replace: list[str] = []
    events: list[tuple[str, str, str]] = []
    errors = {}
    for head in observed.new_heads:
        said = previous_branches.get(head.branch) or {}
        # An untestable head is read again each poll: what reading it says is said once.
        said_before = bool(head.error) and (said.get("commit"), said.get("error")) == (head.commit, head.error)
        if not said_before:
            for warning in head.warnings:
                events.append(("Warning", "DefinitionsWarning", f"branch {head.branch} at {head.commit[:12]}: {warning}"))
        if head.error:
            errors[head.branch] = head
            if not said_before:
                events.append(("Warning", "DefinitionsInvalid",
                               f"branch {head.branch} at {head.commit[:12]}: {head.error}"))
            continue
        if head.no_definitions:
            events.append(("Normal", "NoDefinitions",
                           f"branch {head.branch} at {head.commit[:12]} has no definitions file: nothing to test"))
            continue
        added = 0
        # A head that moved here (not one re-read for a spec edit, where a TestRun cancelled by
        # hand stays cancelled) gets its cancelled TestRuns again.
        came_back = previous_heads.get(head.branch) != head.commit
        for task in head.tasks:
            if (head.commit, task.name) in existing_by_commit_task:
                found = existing_by_commit_task[(head.commit, task.name)]
                if not (came_back and found is not None and found.cancelled):
                    continue  # another branch at the same commit, or a retry after a partial apply
                replace.append(found.name)
            reused = passed_by_hash.get(task.hash)
            if reused is not None and reused.commit == head.commit:
                reused = None
            create.append(TestRunToCreate(head.commit, head.branch, task, reused))
            existing_by_commit_task[(head.commit, task.name)] = None  # counted once across branches
            added += 1
        if added:
            reused_count = sum(1 for item in create[-added:] if item.reused_from is not None)
            reused_note = f", {reused_count} passed before with the same content and are not run again" if reused_count else ""
            events.append(("Normal", "TestRunsCreated",
                           f"branch {head.branch} at {head.commit[:12]}: {added} TestRuns{reused_note} ({head.reason})"))
    still_invalid = _still_invalid(tested, errors, previous_status, {head.branch for head in observed.new_heads})

    # No tested branch at all is more likely a typo in spec.branches (or a remote showing
    # nothing) than every commit going away: cancel nothing then, and say so in Ready.
    cancel = [
        run.name for run in observed.testruns
        if tested and not run.ended and not run.cancel and run.commit not in observed.reachable_commits
    ]
    if cancel:
        events.append(("Normal", "TestRunsCancelled",
                       f"{len(cancel)} TestRuns of commits no tested branch contains any more were cancelled"))

    delete = _past_retention(spec, observed, tested, create)
    branches = _branch_tallies(tested, observed.testruns, create, set(cancel) | set(replace), still_invalid)

    if still_invalid:
        messages = [f"{entry['branch']} at {entry['commit'][:12]}: {entry['error']}" for entry in still_invalid]
        definitions_condition = ("DefinitionsValid", "False", "DefinitionsInvalid", "; ".join(messages))
    else:
        definitions_condition = ("DefinitionsValid", "True", "Resolved",
                                 "the definitions of every tested branch head resolve")
    if still_invalid:
        ready = ("Ready", "False", "DefinitionsInvalid", "a tested branch head has definitions that do not resolve")
    elif not tested:
        globs = ", ".join(spec.get("branches") or ["main"])
        ready = ("Ready", "False", "NoTestedBranches",
                 f"no branch of the repository matches spec.branches ({globs}): nothing is tested or cancelled")
    else:
        ready = ("Ready", "True", "Polling", f"testing {len(tested)} branches")
    conditions = [
        ("GitReachable", "True", "Fetched", "the last fetch succeeded"),
        definitions_condition,
        ready,
    ]
    return PollDecision(create, cancel, delete, events, conditions, branches, branches_summary(branches), replace)


def decide_git_failure(message: str, previous_status: dict) -> PollDecision:
    """A fetch failed (or the credentials could not be read): nothing is created or cancelled,
    since what the remote holds is unknown; the branches keep their last known state."""
    was_reachable = _condition_status(previous_status, "GitReachable") != "False"
    events = [("Warning", "GitUnreachable", message)] if was_reachable else []
    branches = list(previous_status.get("branches") or [])
    return PollDecision(
        create=[], cancel=[], delete=[], events=events,
        conditions=[("GitReachable", "False", "FetchFailed", message),
                    ("Ready", "False", "GitUnreachable", "the repository cannot be fetched")],
        branches=branches, branches_summary=branches_summary(branches),
    )


def decide_suspended(previous_status: dict, testruns: Iterable[ExistingTestRun]) -> PollDecision:
    """`suspend: true`: no fetch and nothing created; the tallies of the known heads stay current."""
    known = {entry["name"]: entry["commit"] for entry in previous_status.get("branches") or [] if entry.get("commit")}
    branches = _branch_tallies(known, tuple(testruns), [], set(), [])
    return PollDecision(
        create=[], cancel=[], delete=[], events=[],
        conditions=[("Ready", "False", "Suspended", "spec.suspend is true: not polling or creating TestRuns")],
        branches=branches, branches_summary=branches_summary(branches),
    )


def retally(previous_status: dict, testruns: Iterable[ExistingTestRun]) -> tuple[list[dict], str]:
    """The branch tallies recounted from the TestRuns as they are now, for the heads the last
    poll wrote (no fetch): a TestRun that ended shows on the Repo at once, not at the next poll.
    An untestable head keeps its error."""
    previous = list(previous_status.get("branches") or [])
    known = {entry["name"]: entry["commit"] for entry in previous if entry.get("name") and entry.get("commit")}
    invalid = [{"branch": entry["name"], "error": entry["error"]} for entry in previous if entry.get("error")]
    branches = _branch_tallies(known, tuple(testruns), [], set(), invalid)
    return branches, branches_summary(branches)


def pinned_repos(repository: str, url_keys: dict[str, str]) -> list[str]:
    """The Repos (by name; `url_keys` gives each one's normalised URL) a definitions file's pin
    of `repository` means: the Repo of that name, else those whose URL ends with it
    (`team/lib` finds `https://git.example.com/team/lib.git`). More than one is ambiguous."""
    if repository in url_keys:
        return [repository]
    wanted = repository.strip("/").lower()
    return sorted(name for name, key in url_keys.items() if key == wanted or key.endswith("/" + wanted))


def with_pins(definition: dict, repos: dict) -> dict:
    """The task's definition with the pins it reads (`pins: {PIN: {repository, commit}}`, from
    the definitions' `repos`): its own `repo` when it is another repository's build, and the
    `repo` of each of its dependencies. The TestRun keeps them, so its runs are served the
    pinned commits the plan saw, whatever the file says later."""
    wanted = {definition.get("repo", "HEAD")} | {
        dependency.get("repo", "HEAD") for dependency in (definition.get("dependencies") or {}).values()}
    pins = {pin: {"repository": repos[pin]["repository"], "commit": repos[pin]["commit"]}
            for pin in sorted(wanted - {"HEAD"}) if pin in repos and repos[pin].get("commit")}
    return {**definition, "pins": pins} if pins else definition


def next_poll_delay(interval: float, consecutive_failures: int, cap: float = 600.0) -> float:
    """The poll interval, doubled for each failure in a row (at most `cap`): an unreachable host
    is asked less and less often, and never delays the other Repos (each has its own loop)."""
    if consecutive_failures <= 0:
        return interval
    return min(interval * 2 ** min(consecutive_failures, 10), max(cap, interval))


def branches_summary(branches: list[dict]) -> str:
    """The BRANCHES column: `main@0123abcd 5 passed 1 failed, dev@89ab... 2 running`."""
    parts = []
    for entry in branches:
        counts = [f"{entry[key]} {key}" for key in ("passed", "failed", "flaky", "running") if entry.get(key)]
        if entry.get("error"):
            counts = ["untestable"]
        parts.append(" ".join([f"{entry['name']}@{entry['commit'][:8]}", *counts]))
    return ", ".join(parts)


def _passed_by_hash(testruns: Iterable[ExistingTestRun]) -> dict[str, ExistingTestRun]:
    """For each task hash, the earliest TestRun that really ran and passed with it, so chains of
    reuse all name the run that ran. When retention has deleted that one, the origin a reuse of
    it names (as a record with the origin's name and commit): the result is in the store."""
    found: dict[str, ExistingTestRun] = {}
    origins: dict[str, ExistingTestRun] = {}
    for run in sorted(testruns, key=lambda r: (r.created, r.name)):
        if run.result != "passed" or not run.hash:
            continue
        if not run.result_from_testrun:
            found.setdefault(run.hash, run)
        else:
            origins.setdefault(run.hash, dataclasses.replace(
                run, name=run.result_from_testrun, commit=run.result_from_commit,
                result_from_testrun="", result_from_commit=""))
    return {**origins, **found}


def _still_invalid(tested: dict[str, str], errors: dict[str, HeadObservation], previous_status: dict,
                   read_again: set[str]) -> list[dict]:
    """Tested branches whose current head is untestable: the errors of heads read now, and the
    old ones of heads that were not read again."""
    invalid = []
    previous = {entry.get("name"): entry for entry in previous_status.get("branches") or []}
    for name, sha in tested.items():
        if name in errors:
            invalid.append({"branch": name, "commit": sha, "error": errors[name].error})
        elif name not in read_again and previous.get(name, {}).get("commit") == sha and previous[name].get("error"):
            invalid.append({"branch": name, "commit": sha, "error": previous[name]["error"]})
    return invalid


def _past_retention(spec: dict, observed: PollObservations, tested: dict[str, str],
                    create: list[TestRunToCreate]) -> list[str]:
    """Ended TestRuns of commits older than the newest `retention.keepCommits` (the heads of
    tested branches are always kept). History stays in the store; only the objects go. One that
    has not ended stays until it has: its result is not in the store yet."""
    keep = int((spec.get("retention") or {}).get("keepCommits") or 50)
    first_seen: dict[str, str] = {}
    for run in observed.testruns:
        if run.commit not in first_seen or run.created < first_seen[run.commit]:
            first_seen[run.commit] = run.created
    for item in create:
        first_seen.setdefault(item.commit, observed.now)
    # Creation times have whole seconds: of commits first seen in the same second, a tested
    # head counts as the newer (it is kept anyway), then the commit, so the choice never
    # depends on the order the API listed them in.
    heads = set(tested.values())
    newest = sorted(first_seen, key=lambda commit: (first_seen[commit], commit in heads, commit), reverse=True)
    kept = set(newest[:keep]) | heads
    return sorted(run.name for run in observed.testruns if run.commit not in kept and run.ended)


def _branch_tallies(tested: dict[str, str], testruns: tuple[ExistingTestRun, ...], create: list[TestRunToCreate],
                    cancelled: set[str], invalid: list[dict]) -> list[dict]:
    by_commit: dict[str, dict[str, int]] = defaultdict(lambda: {"passed": 0, "failed": 0, "flaky": 0, "running": 0})
    for run in testruns:
        tally = by_commit[run.commit]
        if run.name in cancelled:
            continue
        if not run.ended:
            tally["running"] += 1
        elif run.result in ("passed", "flaky"):
            tally[run.result] += 1
        elif run.result in ("failed", "timeout", "error", "blocked"):
            tally["failed"] += 1
    for item in create:
        key = "passed" if item.reused_from is not None else "running"
        by_commit[item.commit][key] += 1
    errors = {entry["branch"]: entry["error"] for entry in invalid}
    branches = []
    for name, sha in tested.items():
        entry = {"name": name, "commit": sha, **by_commit[sha]}
        if name in errors:
            entry["error"] = errors[name]
        branches.append(entry)
    return branches


def _condition_status(status: dict, condition_type: str) -> str:
    for condition in status.get("conditions") or []:
        if condition.get("type") == condition_type:
            return condition.get("status", "")
    return ""
