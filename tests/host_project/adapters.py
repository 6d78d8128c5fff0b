"""
The host's destination adapter: push-notification audiences.

The host already has a client for its push provider (``PushClient``); the
adapter only translates between that client and cohortsync.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

import cohortsync as cs
from cohortsync.exceptions import (
    AuthenticationError,
    BadDataError,
    PermanentError,
    RateLimitedError,
    TransientError,
)


class PushApiError(Exception):
    """
    What the host's push client raises for an error answer.
    """

    def __init__(self, status: int, retry_after: float | None = None) -> None:
        self.status = status
        self.retry_after = retry_after
        super().__init__(f"push API answered HTTP {status}")


class PushClient(Protocol):
    """
    The part of the host's push-provider client the adapter uses.
    """

    def update_segment(
        self, segment: str, users: Sequence[str], *, member: bool, request_id: str
    ) -> list[str]:
        """
        Add (``member=True``) or remove users; return the users the provider
        refused. Requests repeating a ``request_id`` are applied once.

        Raises:
            PushApiError: The provider answered with an error status.
            TimeoutError: No answer in time.
        """
        ...


class PushAudience(cs.Destination):
    """
    Keeps a push segment named after the cohort in sync with it.
    """

    capabilities: ClassVar[cs.Capabilities] = cs.Capabilities(
        name="Push audiences", supports_realtime=True, max_batch_size=500
    )

    def __init__(self, client: PushClient) -> None:
        self.client = client

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        return self._update(batch, member=True)

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return self._update(batch, member=False)

    def _update(self, batch: cs.Batch, *, member: bool) -> cs.DeliveryResult:
        segment = f"cohort-{batch.context.cohort_id}"
        try:
            refused = self.client.update_segment(
                segment, batch.identifiers, member=member, request_id=batch.idempotency_key
            )
        except TimeoutError as e:
            raise TransientError("push API timed out") from e
        except PushApiError as e:
            raise _library_error(e) from e
        sent = set(batch.identifiers)
        # The provider reports refusals per request; only this batch's users count.
        return cs.DeliveryResult.partial(
            cs.Rejection(user, "unknown device") for user in dict.fromkeys(refused) if user in sent
        )


def _library_error(error: PushApiError) -> Exception:
    status = error.status
    if status == 429:
        return RateLimitedError(str(error), retry_after=error.retry_after)
    if status >= 500:
        return TransientError(str(error), retry_after=error.retry_after)
    if status in {401, 403}:
        return AuthenticationError(str(error))
    if status in {400, 413, 422}:
        return BadDataError(str(error))
    return PermanentError(str(error))
