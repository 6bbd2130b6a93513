"""Other repositories' pinned commits for the runs: a TestRun's definition keeps the pins it
reads (`pins: {PIN: {repository, commit}}`, written by decisions.repo.with_pins when the plan
made it), and the trees are served from the mirror of the Repo each pin names, found as the
definitions engine finds it (cluster.repo_handlers.other_repositories, repos/lookup.py)."""

from __future__ import annotations

import asyncio

from testlooper.workerapi.cluster import InputSource


async def pinned_source(context, namespace: str, own_uid: str, definition: dict, pin: str,
                        path: str = "") -> InputSource:
    """``path`` of the commit ``pin`` names, as a source input; when it cannot be served (the
    pinned Repo is gone, or not fetched yet), one whose ``unavailable`` says why."""
    from testlooper.cluster.repo_handlers import other_repositories
    from testlooper.repos.lookup import RepositoryLookupError

    entry = (definition.get("pins") or {}).get(pin)
    if not entry:
        return InputSource("source", path=path, unavailable=f"the TestRun does not record which commit pin {pin!r} "
                                                            "names (an older operator made it): push again to test it")
    try:
        repo = await asyncio.to_thread(other_repositories(context, namespace, own_uid).repo, entry["repository"])
    except RepositoryLookupError as error:
        return InputSource("source", path=path, unavailable=f"pin {pin!r}: {error}")
    return InputSource("source", path=path, git_dir=repo.git_dir, commit=entry["commit"])
