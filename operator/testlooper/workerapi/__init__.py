"""The worker API: one implementation of the worker protocol (protocol.py) with backends behind
it, the local runner's (local.py) and the operator's pieces (tokens, cluster)."""
