"""The job table: states, tables and the manager that alone writes job rows."""

from node.jobs.manager import JobManager
from node.jobs.states import FINAL_STATES, JobState, TransitionError

__all__ = ["FINAL_STATES", "JobManager", "JobState", "TransitionError"]
