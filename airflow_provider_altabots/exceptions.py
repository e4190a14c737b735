"""
The errors this provider raises, in one small hierarchy.

Every error is an :class:`AltaBotsError`. Each message names the workflow run when one is
known and says what you can do about it. None of them ever carries the API key or a webhook
header value.

=============================  =====================================================  ==========
error                          meaning                                                task retry
=============================  =====================================================  ==========
``AltaBotsConfigError``        a bad argument or connection, or an answer only a      no
                               configuration change can fix (a redirect, an
                               untrusted TLS certificate, an answer over
                               ``max_answer_bytes``)
``AltaBotsAuthError``          the API refused the key (401, 403 or code 40127)       no
``AltaBotsApiError``           the API refused this request (a 4xx or an error code)  yes
``AltaBotsTransientError``     429, 5xx, a broken answer or a network error; asking   yes
                               again may work
``AltaBotsInvokeUncertain``    the invoke may or may not have started a (billed) run  no
``AltaBotsRunFailed``          the run ended with status FAILED                       yes
``AltaBotsRunTimeout``         the run did not end before the operator's ``timeout``  yes
``AltaBotsStatusUnknown``      too many polls in a row failed; the run's fate is      yes
                               unknown
=============================  =====================================================  ==========

"task retry" says whether Airflow's task retries apply. Configuration and key errors fail the
task at once, because a retry with the same arguments cannot succeed; an uncertain invoke fails
at once because a retry could start, and pay for, a second run.

In a deferrable task the trigger reports an error as an event; :attr:`AltaBotsError.event_status`
names it there, and :func:`airflow_provider_altabots.events.error_from_event` turns the event
back into the same error on the worker.
"""

from __future__ import annotations

from typing import ClassVar

from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException


class AltaBotsError(AirflowException):
    """
    Base class of every error of this provider.

    :param message: what happened and what the user can do.
    :param run_id: the workflow run concerned, when one is known.
    """

    #: The ``status`` a trigger event carries for this error.
    event_status: ClassVar[str] = "error"

    def __init__(self, message: str, *, run_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.run_id = run_id


class AltaBotsConfigError(AltaBotsError, AirflowFailException):
    """
    An operator argument or the connection is invalid, or the API's answer can only be read
    after a configuration change (a redirect, an untrusted certificate, an answer larger than
    ``max_answer_bytes``). Raised for arguments and connection fields before any request is sent.
    """

    event_status = "config"


class AltaBotsAuthError(AltaBotsError, AirflowFailException):
    """The API refused the API key (HTTP 401 or 403, or error code 40127)."""

    event_status = "auth"


class AltaBotsApiError(AltaBotsError):
    """
    The API answered this request with an error that asking again will not fix.

    :param code: the vendor's error code (``40000`` parameter error, ``20022`` insufficient
        credits, ``20055`` API switched off for this agent, ...), when the answer had one.
    :param http_status: the HTTP status of the answer.
    :param run_not_found: the API's own error body says the run id asked for is not found (see
        :func:`airflow_provider_altabots.protocol.says_run_not_found`): the one answer after
        which a task that stored the id may start a new run.
    """

    event_status = "api_error"

    def __init__(
        self,
        message: str,
        *,
        run_id: str | None = None,
        code: int | str | None = None,
        http_status: int | None = None,
        run_not_found: bool = False,
    ) -> None:
        super().__init__(message, run_id=run_id)
        self.code = code
        self.http_status = http_status
        self.run_not_found = run_not_found


class AltaBotsTransientError(AltaBotsError):
    """
    The request failed in a way that asking again later may fix: HTTP 429, 5xx, an answer that
    makes no sense (not JSON, another run's record), or a network error.

    :param retry_after: seconds the API asked us to wait (``Retry-After`` or
        ``X-RateLimit-Reset``), when it said.
    :param rate_limited: the answer was HTTP 429.
    :param sent: ``False`` when the request surely never reached the API (connection refused,
        connect timeout, name not resolved, TLS handshake failed). Only such an invoke, or a 429,
        is safe to send again; an invoke that may have been sent fails as
        :class:`AltaBotsInvokeUncertain` instead.
    """

    event_status = "transient"

    def __init__(
        self,
        message: str,
        *,
        run_id: str | None = None,
        retry_after: float | None = None,
        rate_limited: bool = False,
        sent: bool = True,
    ) -> None:
        super().__init__(message, run_id=run_id)
        self.retry_after = retry_after
        self.rate_limited = rate_limited
        self.sent = sent


class AltaBotsInvokeUncertain(AltaBotsError, AirflowFailException):
    """
    The invoke request may have started a run, but no answer said so.

    The API has no idempotency key, so neither the provider nor Airflow's task retries send such
    an invoke again: doing so could start, and bill, a second run. Look for the run in the
    vendor's console, then clear the task if you want a new one.
    """

    event_status = "invoke_uncertain"


class AltaBotsRunFailed(AltaBotsError):
    """The workflow run ended with status ``FAILED``."""

    event_status = "failed"


class AltaBotsRunTimeout(AltaBotsError):
    """
    The run had not ended when the operator's ``timeout`` passed.

    :param last_status: the status seen at the final check.
    """

    event_status = "timeout"

    def __init__(self, message: str, *, run_id: str | None = None, last_status: str | None = None) -> None:
        super().__init__(message, run_id=run_id)
        self.last_status = last_status


class AltaBotsStatusUnknown(AltaBotsError):
    """Too many status checks in a row failed; whether the run ended, and how, is unknown."""

    event_status = "unknown"
