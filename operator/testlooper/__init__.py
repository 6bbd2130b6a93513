"""TestLooper: statistical CI for git repositories, as a Kubernetes operator and a local runner."""

__version__ = "0.1.0"
