"""How long to wait before trying again: the quick retries inside a request, and the
queue's backoff between a worker's attempts."""

import logging
import random
from collections.abc import Callable

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from channels.base import TransientDeliveryError
from config import Settings

logger = logging.getLogger(__name__)


def quick_retries(settings: Settings) -> Retrying:
    """The retry policy of a synchronous send: only transient failures, exponential
    backoff with jitter, bounded by RETRY_ATTEMPTS and RETRY_MAX_TIME.

    A provider that asks for a pause (Telegram's retry_after, a Retry-After header) gets at
    least that; one longer than RETRY_MAX_WAIT is left to the queue's backoff."""
    backoff = wait_exponential_jitter(
        multiplier=settings.retry_initial_wait,
        max=settings.retry_max_wait,
        jitter=settings.retry_jitter,
    )

    def retry_now(exc: BaseException) -> bool:
        return isinstance(exc, TransientDeliveryError) and (
            exc.retry_after is None or exc.retry_after <= settings.retry_max_wait
        )

    def wait(state: RetryCallState) -> float:
        assert state.outcome is not None
        asked = getattr(state.outcome.exception(), "retry_after", None)
        return max(backoff(state), asked or 0.0)

    return Retrying(
        retry=retry_if_exception(retry_now),
        stop=stop_after_attempt(settings.retry_attempts)
        | stop_before_delay(settings.retry_max_time),
        wait=wait,
        before_sleep=_log_backoff,
        reraise=True,
    )


def _log_backoff(state: RetryCallState) -> None:
    if state.next_action is not None:
        logger.info("next attempt in %.2f s", state.next_action.sleep)


def exponential_jitter(
    attempts: int,
    *,
    initial: float,
    maximum: float,
    jitter: float,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait after `attempts` attempts: `initial` doubled for each attempt after
    the first, plus up to `jitter`, at most `maximum`."""
    try:
        wait = initial * 2 ** (attempts - 1) + uniform(0, jitter)
    except OverflowError:
        # Past some thousand attempts 2**n is too large for a float: the longest wait.
        return maximum
    return max(0.0, min(wait, maximum))


def queue_backoff(settings: Settings) -> Callable[[int], float]:
    """The background retries' wait after a number of attempts on a channel, in seconds:
    QUEUE_RETRY_INITIAL_WAIT doubled each time, with as much jitter, at most
    QUEUE_RETRY_MAX_WAIT."""

    def backoff(attempts: int) -> float:
        return exponential_jitter(
            attempts,
            initial=settings.queue_retry_initial_wait,
            maximum=settings.queue_retry_max_wait,
            jitter=settings.queue_retry_initial_wait,
        )

    return backoff
