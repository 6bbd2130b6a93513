"""Pure decisions shared by the shells: (resource, observations) -> (status patch, actions).

Nothing here does I/O. The kopf handlers in `cluster/` gather observations (git, the API),
call these functions, and apply what they return; the local runner shares the rules that
apply to it.
"""
