"""How a failure to send is classified, for C-STORE and STOW-RS destinations alike.

The sender turns each kind into the destination's delivery state (``node.sender``):
transient failures are retried with backoff until ``send_give_up_hours``; refusals
fail the destination after ``send_max_attempts``; broken ones fail it at once.
"""

from __future__ import annotations

from enum import StrEnum


class Failure(StrEnum):
    """What a failure to send says about trying again."""

    TRANSIENT = "transient"
    REFUSED = "refused"
    BROKEN = "broken"


class DeliveryError(Exception):
    """Sending to one destination stopped; ``failure`` says whether trying later can help.

    ``retry_after`` is the peer's own wish (HTTP Retry-After, seconds): the job is not
    tried again sooner.
    """

    def __init__(
        self,
        destination: str,
        message: str,
        failure: Failure,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{destination}: {message}")
        self.destination = destination
        self.message = message
        self.failure = failure
        self.retry_after = retry_after


def is_retryable_status(code: int) -> bool:
    """Out of resources (0xA7xx) and resource limitation (0x0213) may pass; others do not."""
    return 0xA700 <= code <= 0xA7FF or code == 0x0213
