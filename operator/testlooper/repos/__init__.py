"""Adapter: repositories as the engine sees them.

`definitions` finds and resolves a definitions file in a tree on disk or in a commit; both the
local runner and the operator load definitions through it.
"""
