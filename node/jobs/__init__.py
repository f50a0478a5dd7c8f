"""The job table: states, tables, the manager that alone writes job rows, its read models."""

from node.jobs.manager import JobManager
from node.jobs.queries import JobQueries
from node.jobs.registry import WorkerRegistry
from node.jobs.states import FINAL_STATES, JobState, TransitionError

__all__ = [
    "FINAL_STATES",
    "JobManager",
    "JobQueries",
    "JobState",
    "TransitionError",
    "WorkerRegistry",
]
