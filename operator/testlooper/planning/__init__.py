"""Planning: which builds and tests run for a commit (pure, no I/O)."""

from testlooper.planning.planner import match_glob, plan

__all__ = ["match_glob", "plan"]
