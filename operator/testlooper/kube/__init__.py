"""The Kubernetes adapter: the custom resources' models, their CRDs, and pure object builders.

Nothing here talks to an API server; the operator's shell (`cluster/`) does, using these.
"""
