"""Moved to testlooper.workerapi (one implementation of the worker protocol, with backends);
kept so that older imports still work."""

from testlooper.workerapi.local import ArtifactRecord, RunStatus, WorkerApiServer, safe_file_name  # noqa: F401
from testlooper.workerapi.protocol import OUTCOMES, artifact_name_from_segment  # noqa: F401
