"""Repos: one daemon per Repo polls its git mirror, plans each new head and creates its TestRuns.

Thin by design: `poll` gathers observations (the Secret, the fetch, the definitions and plan of
each moved head, the Repo's TestRuns, reachability) and `apply` carries out what
`decisions.repo` decided. Git work runs in threads, at most `--max-concurrent-polls` at once
across all Repos, so one slow or unreachable host never holds up the others' event loop.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import time

import kopf

from testlooper.cluster.context import OperatorContext
from testlooper.decisions import repo as decide
from testlooper.decisions.testrun import RESULT_FROM_COMMIT, RESULT_FROM_TESTRUN
from testlooper.repos.mirror import GitCredentials, GitMirror, MirrorError

CREATE_CONCURRENCY = 8
RETALLY_INTERVAL_SECONDS = 2.0  # the branch tallies are recounted (without a poll) at most this often
BRANCH_LINE_DEPTH = 1000  # first-parent commits kept per branch for `history --repo`
logger = logging.getLogger(__name__)


def register(registry: kopf.OperatorRegistry) -> None:
    kopf.daemon("testlooper.dev", "v1alpha1", "repos", registry=registry, id="poll",
                cancellation_timeout=10.0)(repo_daemon)
    kopf.on.delete("testlooper.dev", "v1alpha1", "repos", registry=registry, id="forget",
                   optional=True)(forget_repo)


async def repo_daemon(name: str, namespace: str, uid: str, body: kopf.Body, stopped: kopf.DaemonStopped,
                      memo: OperatorContext, **_) -> None:
    """Poll until the Repo is deleted or the operator stops: now, then every
    pollIntervalSeconds, at once when a webhook or a spec change asks."""
    context = memo
    watched = context.repos.register(namespace, name, uid, body.get("spec") or {})
    context.metrics.repos.set(len(context.repos))
    failures = 0
    seen_generation = None
    # This daemon is the only writer of the Repo's status, so what it wrote last is the truth even
    # before the watch brings the patched object back; at start (a restart) the object's own.
    status = dict(body.get("status") or {})
    retallied_at = 0.0  # when the branch tallies were last recounted without a poll
    try:
        while not stopped:
            spec = dict(body.get("spec") or {})
            watched = context.repos.register(namespace, name, uid, spec)
            seen_generation = body.get("metadata", {}).get("generation")
            watched.wake.clear()
            try:
                fetched, status = await poll(context, body, name, namespace, uid, status)
                failures = 0 if fetched else failures + 1
            except Exception as exc:  # an API error mid-apply: count it, retry with backoff, never crash
                failures += 1
                context.metrics.reconcile_errors.labels("Repo").inc()
                logger.warning("Repo %s/%s: poll failed, retrying: %s", namespace, name, exc)
            deadline = time.monotonic() + decide.next_poll_delay(_poll_interval(spec), failures)

            def moved(seen=seen_generation) -> bool:  # a spec edit: poll now
                return body.get("metadata", {}).get("generation") != seen

            while await _sleep_until_woken(deadline - time.monotonic(), watched, stopped, moved, retallied_at):
                status = await _retally_logged(context, name, namespace, status, watched)
                retallied_at = time.monotonic()
    finally:
        context.repos.unregister(uid)
        context.metrics.repos.set(len(context.repos))


async def forget_repo(name: str, namespace: str, uid: str, memo: OperatorContext, **_) -> None:
    """A deleted Repo's mirror and metric series go (its TestRuns follow by owner reference)."""
    memo.metrics.forget_repo(namespace, name)
    if memo.flaky_cases is not None:
        memo.flaky_cases.forget(namespace, name)
    await asyncio.to_thread(GitMirror(memo.mirror_path(namespace, name, uid), "").remove)


async def _sleep_until_woken(delay: float, watched, stopped: kopf.DaemonStopped, moved,
                             retallied_at: float = 0.0) -> bool:
    """Sleeps until the next poll is due or something asks for one; True when it is woken only
    to recount the branch tallies (a TestRun ended), after which it sleeps on. Recounts come
    at most every RETALLY_INTERVAL_SECONDS: each lists the Repo's TestRuns, and 500 TestRuns
    ending one after the other would otherwise list them all some 50 times."""
    deadline = time.monotonic() + delay
    while not stopped and not watched.wake.is_set() and not moved():
        if watched.retally.is_set() and time.monotonic() - retallied_at >= RETALLY_INTERVAL_SECONDS:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(watched.wake.wait(), timeout=min(remaining, 0.5))
        except asyncio.TimeoutError:
            pass
    return False


async def _retally_logged(context: OperatorContext, name: str, namespace: str, status: dict, watched) -> dict:
    """The branch tallies recounted from the Repo's TestRuns as they are now (no fetch, no
    planning), written if they changed; returns the status written."""
    from testlooper.kube.objects import REPO_LABEL, label_value

    watched.retally.clear()
    try:
        listed = await context.api.list_objects("testruns", namespace, f"{REPO_LABEL}={label_value(name)}")
        branches, summary = decide.retally(status, [_existing(item) for item in listed])
        if branches == (status.get("branches") or []) and summary == status.get("branchesSummary", ""):
            return status
        patch = {"branches": branches, "branchesSummary": summary}
        await context.api.patch_status("repos", namespace, name, patch)
        return {**status, **patch}
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the next poll writes the tallies anyway
        context.metrics.reconcile_errors.labels("Repo").inc()
        logger.warning("Repo %s/%s: branch tallies not recounted: %s", namespace, name, exc)
        return status


async def poll(context: OperatorContext, body: kopf.Body, name: str, namespace: str, uid: str,
               status: dict) -> tuple[bool, dict]:
    """One poll from the last written `status`; returns (whether git could be reached, so the
    caller backs off when not; the status written)."""
    # One snapshot of spec and generation: kopf updates `body` while the poll awaits, and an
    # edit landing mid-poll must not be recorded as observed by a poll that used the old spec.
    spec = dict(body.get("spec") or {})
    generation = body.get("metadata", {}).get("generation")
    now = _now()
    invalid = _spec_problem(spec)
    if invalid:
        return True, await _apply_status(context, name, namespace, status, now, generation,
                                         [("Ready", "False", "InvalidSpec", invalid)], status.get("branches") or [],
                                         status.get("branchesSummary", ""), message=invalid,
                                         observed_generation=generation)
    from testlooper.kube.objects import REPO_LABEL, label_value

    listed = await context.api.list_objects("testruns", namespace, f"{REPO_LABEL}={label_value(name)}")
    testruns = tuple(_existing(item) for item in listed)
    if spec.get("suspend"):
        decision = decide.decide_suspended(status, testruns)
        return True, await apply(context, body, spec, name, namespace, status, now, generation, decision,
                                 observed_generation=generation)

    started = time.monotonic()
    labels = (namespace, name)
    try:
        credentials = await _credentials(context, namespace, spec)
        mirror = GitMirror(context.mirror_path(namespace, name, uid), spec["url"], credentials)
        async with context.poll_slots:
            try:
                heads = await asyncio.to_thread(mirror.fetch)
            except asyncio.CancelledError:  # stopping: the fetch thread must not outlive us
                mirror.abort()
                raise
            tested = decide.tested_branches(spec.get("branches") or ["main"], heads)
            # A spec edit (definitionsPath, testSets, runs...) changes what every head runs:
            # read them all again; what exists already is not created twice.
            respec = generation != status.get("observedGeneration")
            moved = tested if respec else decide.moved_heads(tested, status.get("branches") or [])
            repositories = other_repositories(context, namespace, uid)
            new_heads = []
            for branch, sha in moved.items():
                new_heads.append(await asyncio.to_thread(observe_head, mirror, branch, sha, spec, repositories))
            unended = {run.commit for run in testruns if not run.ended and not run.cancel}
            reachable = await asyncio.to_thread(mirror.reachable, unended, list(tested.values()))
    except (MirrorError, CredentialsProblem) as exc:
        context.metrics.git_poll_errors.labels(*labels).inc()
        logger.warning("Repo %s/%s: %s", namespace, name, exc)  # redacted: see repos/mirror.py
        # Nothing was read with this spec: the generation stays unobserved, so the first poll
        # that fetches reads every head with it.
        return False, await apply(context, body, spec, name, namespace, status, now, generation,
                                  decide.decide_git_failure(str(exc), status),
                                  observed_generation=status.get("observedGeneration"))
    finally:
        context.metrics.git_poll_seconds.labels(*labels).observe(time.monotonic() - started)
        context.metrics.last_poll.labels(*labels).set_to_current_time()

    watched = context.repos.get(uid)
    if context.store is not None and watched is not None:
        await asyncio.to_thread(record_branch_lines, context, f"{namespace}/{name}", mirror, tested, watched)
        if context.flaky_cases is not None:  # the flaky-cases gauge of each tested branch
            context.flaky_cases.branches_tested(namespace, name, tested)
    observed = decide.PollObservations(heads=heads, new_heads=tuple(new_heads), testruns=testruns,
                                       reachable_commits=frozenset(reachable), now=now)
    decision = decide.decide_poll(spec, status, observed)
    # Counted as warned about: an untestable head is read again each poll, its error once.
    invalid = sum(1 for event in decision.events if event[1] == "DefinitionsInvalid")
    if invalid:
        context.metrics.definitions_errors.labels(*labels).inc(invalid)
    return True, await apply(context, body, spec, name, namespace, status, now, generation, decision,
                             observed_generation=generation)


def observe_head(mirror: GitMirror, branch: str, sha: str, spec: dict, repositories=None) -> decide.HeadObservation:
    """Resolve and plan one new head (blocking: runs in a thread). `repositories` (repos/lookup.py)
    reads the other repositories the file pins: the mirrors of other Repos in the namespace."""
    from testlooper import gitio
    from testlooper.definitions import DefinitionsError
    from testlooper.planning import plan
    from testlooper.repos.definitions import definitions_at_commit, pinned_changes_at

    repo = mirror.repo()
    warnings: list[str] = []
    try:
        definitions = definitions_at_commit(repo, sha, spec.get("definitionsPath") or None,
                                            repositories=repositories, warn=lambda w: warnings.append(str(w)))
        if definitions is None:
            return decide.HeadObservation(branch, sha, no_definitions=True, warnings=tuple(warnings))
        planned = plan(definitions, gitio.changed_files(repo, sha), test_sets=spec.get("testSets") or (),
                       runs=spec.get("runs"),
                       pinned_changes=pinned_changes_at(repo, sha, definitions, repositories))
    except (DefinitionsError, gitio.GitError, OSError, ValueError) as exc:
        return decide.HeadObservation(branch, sha, error=_one_line(exc), warnings=tuple(warnings))
    tree = repo.git.rev_parse(f"{sha}^{{tree}}")
    tasks = []
    for task in planned["tasks"]:
        if task["name"] in definitions.get("external_builds", {}):
            # Another repository's build, at the commit this file pins: its result depends on
            # that repository's tree, not on this commit's.
            definition = definitions["external_builds"][task["name"]]
            pin = definitions["repos"][definition["repo"]]
            source_tree = repositories.repo(pin["repository"]).git.rev_parse(f"{pin['commit']}^{{tree}}")
        else:
            definition = definitions["builds" if task["kind"] == "build" else "tests"][task["name"]]
            source_tree = tree
        tasks.append(decide.PlannedTask(
            name=task["name"], kind=task["kind"], runs=task["runs"],
            hash=decide.run_content_hash(task["hash"], source_tree),
            depends_on=tuple(task["depends_on"]), definition=decide.with_pins(definition, definitions["repos"]),
        ))
    return decide.HeadObservation(branch, sha, tasks=tuple(tasks), reason=planned["reason"], warnings=tuple(warnings))


def record_branch_lines(context: OperatorContext, repo_id: str, mirror: GitMirror, tested: dict[str, str],
                        watched) -> None:
    """Keep each tested branch's first-parent line in the history store (blocking: in a thread),
    so that `testlooper history --repo NAMESPACE/NAME` needs no checkout. A store that is down
    is asked again at the next poll."""
    from testlooper import gitio
    from testlooper.store import StoreError

    for branch, head in tested.items():
        if watched.lines_recorded.get(branch) == head:
            continue
        try:
            line = gitio.first_parent_line(mirror.repo(), head, BRANCH_LINE_DEPTH)
            context.store.record_branch_line(repo_id, branch, line)
        except (StoreError, gitio.GitError) as exc:
            context.metrics.store_errors.labels("record_branch_line").inc()
            logger.warning("Repo %s: branch %s's line not recorded, will retry: %s", repo_id, branch, exc)
            return
        watched.lines_recorded[branch] = head


def other_repositories(context: OperatorContext, namespace: str, own_uid: str):
    """Pinned repositories by name, as the definitions file writes them: the Repo of that name
    in the same namespace, else the one Repo there whose URL ends with that name
    (`team/lib` finds `https://git.example.com/team/lib.git`). Its mirror is what is read."""
    from testlooper.repos.lookup import GitRepositories, RepositoryLookupError

    def find(repository: str):
        candidates = {watched.name: watched for watched in context.repos.in_namespace(namespace)
                      if watched.uid != own_uid}
        chosen = decide.pinned_repos(repository, {name: w.url_key for name, w in candidates.items()})
        if len(chosen) > 1:
            raise RepositoryLookupError(f"the Repos {', '.join(chosen)} of namespace {namespace} all have URLs "
                                        f"ending with {repository!r}: pin one of them by its name")
        if not chosen:
            return None
        watched = candidates[chosen[0]]
        path = context.mirror_path(namespace, watched.name, watched.uid)
        return path if os.path.isdir(path) else None

    return GitRepositories(find, missing_hint=f"pinned repositories are the Repos of namespace {namespace}, "
                                              "by name or by the end of their URL, once they have been fetched")


async def apply(context: OperatorContext, body: kopf.Body, spec: dict, name: str, namespace: str, status: dict,
                now: str, generation: int | None, decision: decide.PollDecision, *,
                observed_generation: int | None) -> dict:
    """Carry out `decision`, made from `spec` at `generation`; `observed_generation` is the
    generation whose spec every tested head has now been read with (see _apply_status)."""
    from testlooper.kube.objects import build_testrun, testrun_name

    repo_object = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": dict(body.metadata),
                   "spec": spec}
    pool = spec.get("workerPool") or None
    slots = asyncio.Semaphore(CREATE_CONCURRENCY)

    async def create(item: decide.TestRunToCreate) -> bool:
        task = item.task
        testrun = build_testrun(
            repo_object, commit=item.commit, branch=item.branch, task=task.definition, kind=task.kind,
            runs=task.runs, depends_on=[testrun_name(name, item.commit, dep) for dep in task.depends_on],
            worker_pool=pool, priority=0, task_name=task.name,
        )
        testrun["spec"]["hash"] = task.hash  # what the result depends on: definition and source tree
        if item.reused_from is not None:
            annotations = testrun["metadata"].setdefault("annotations", {})
            annotations[RESULT_FROM_TESTRUN] = item.reused_from.name
            annotations[RESULT_FROM_COMMIT] = item.reused_from.commit
        async with slots:
            return await context.api.create_object("testruns", namespace, testrun)

    # A cancelled TestRun of a head that came back goes first, so its name is free again.
    for testrun in decision.replace:
        await context.api.delete_object("testruns", namespace, testrun)
    # Builds come first in the plan; creating in that order (with bounded overlap) means a
    # consumer never exists long before the build it waits for.
    created = await asyncio.gather(*(create(item) for item in decision.create))
    count = sum(1 for made in created if made)
    replaced = set(decision.replace)
    still_there = [testrun_name(name, item.commit, item.task.name) for item, made in zip(decision.create, created)
                   if not made and testrun_name(name, item.commit, item.task.name) in replaced]
    if still_there:
        # Not deleted yet (a finalizer): the status is not written, so the next poll tries again.
        raise RuntimeError(f"cancelled TestRuns {', '.join(still_there)} are still being deleted; "
                           "they are made again on the next poll")
    if count:
        context.metrics.testruns_created.labels(namespace, name).inc(count)
    for testrun in decision.cancel:
        await context.api.patch_object("testruns", namespace, testrun, {"spec": {"cancel": True}})
    if decision.cancel:
        context.metrics.testruns_cancelled.labels(namespace, name).inc(len(decision.cancel))
    for testrun in decision.delete:
        await context.api.delete_object("testruns", namespace, testrun)
    for event_type, reason, message in decision.events:
        kopf.event(body, type=event_type, reason=reason, message=message[:1000])
    failed_condition = next((c for c in decision.conditions if c[0] == "GitReachable" and c[1] == "False"), None)
    return await _apply_status(context, name, namespace, status, now, generation, decision.conditions,
                               decision.branches, decision.branches_summary,
                               message=failed_condition[3] if failed_condition else "",
                               fetched=any(c[0] == "GitReachable" and c[1] == "True" for c in decision.conditions),
                               observed_generation=observed_generation)


async def _apply_status(context: OperatorContext, name: str, namespace: str, status: dict, now: str,
                        generation: int | None, conditions: list[tuple[str, str, str, str]], branches: list[dict],
                        summary: str, *, observed_generation: int | None, message: str = "",
                        fetched: bool = False) -> dict:
    """Write the Repo's status. Its conditions speak of `generation`; `observedGeneration` says
    which spec every tested head was last read with, so that a poll that could not read them
    leaves the next one to (a spec edit must not be lost to a git outage)."""
    from testlooper.kube.objects import condition, set_condition

    merged = list(status.get("conditions") or [])
    for condition_type, condition_status, reason, text in conditions:
        merged = set_condition(merged, condition(condition_type, condition_status, reason, text, now, generation))
    patch = {"conditions": merged, "branches": branches, "branchesSummary": summary,
             "observedGeneration": observed_generation, "message": message}
    if fetched:
        patch["lastPollTime"] = now
    await context.api.patch_status("repos", namespace, name, patch)
    return {**status, **patch}


class CredentialsProblem(Exception):
    pass


async def _credentials(context: OperatorContext, namespace: str, spec: dict) -> GitCredentials | None:
    secret_name = spec.get("credentialsSecret")
    if not secret_name:
        return None
    secret = await context.api.read_secret(namespace, secret_name)
    if secret is None:
        raise CredentialsProblem(f"credentials Secret {secret_name!r} not found in namespace {namespace}")
    problem = decide.credentials_refusal(secret_name, secret["annotations"], str(spec.get("url") or ""))
    if problem:
        raise CredentialsProblem(problem)
    try:
        return GitCredentials.from_secret_data(secret["data"])
    except ValueError as exc:
        raise CredentialsProblem(f"credentials Secret {secret_name!r} cannot be used: {exc}") from None


def _spec_problem(spec: dict) -> str:
    """What is wrong with a spec the schema let through (or that was written without it), or ""."""
    from testlooper.kube.models import SpecError, parse_repo_spec

    try:
        parse_repo_spec(spec)
    except SpecError as exc:
        return _one_line(exc)
    return ""


def _poll_interval(spec: dict) -> float:
    """spec.pollIntervalSeconds, or its default while the spec is invalid (its condition says why)."""
    value = spec.get("pollIntervalSeconds", 60)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 60.0
    return max(10.0, float(value))


def _existing(item: dict) -> decide.ExistingTestRun:
    spec = item.get("spec") or {}
    status = item.get("status") or {}
    origin = status.get("resultFrom") or {}
    return decide.ExistingTestRun(
        name=item["metadata"]["name"], commit=spec.get("commit", ""), task=spec.get("task", ""),
        hash=spec.get("hash", ""), phase=status.get("phase", ""), result=status.get("result", ""),
        cancel=bool(spec.get("cancel")), created=item["metadata"].get("creationTimestamp", ""),
        result_from_commit=origin.get("commit", ""), result_from_testrun=origin.get("testRun", ""),
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _now() -> str:
    from testlooper.kube.objects import timestamp

    return timestamp(datetime.datetime.now(datetime.timezone.utc))
