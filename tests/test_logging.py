"""The structlog hook: state changes and failures are logged, successes never, secrets never."""

from __future__ import annotations

import pytest
import structlog
from structlog.testing import capture_logs

from veritas_resilience import (
    CircuitBreaker,
    CircuitOpenError,
    FallbackChain,
    ServiceUnavailableError,
    StructlogHook,
    redact,
)
from veritas_resilience.testing import FakeClock

pytestmark = pytest.mark.anyio


async def test_logs_state_changes_and_failures_but_not_successes(clock: FakeClock) -> None:
    """One line per failure and per state change; none for successes or rejections."""
    breaker = CircuitBreaker(
        name="db",
        failure_threshold=2,
        reset_timeout=5,
        clock=clock,
        hooks=[StructlogHook(structlog.get_logger("test"))],
    )

    async def ok() -> int:
        return 1

    async def down() -> int:
        raise ConnectionError("could not connect to postgresql://app:hunter2@db1:5432/app")

    with capture_logs() as logs:
        for _ in range(20):
            await breaker.call(ok)
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await breaker.call(down)
        with pytest.raises(CircuitOpenError):
            await breaker.call(ok)
        clock.advance(5)
        await breaker.call(ok)
    events = [(line["event"], line["log_level"]) for line in logs]
    assert events == [
        ("circuit_breaker_call_failed", "warning"),
        ("circuit_breaker_call_failed", "warning"),
        ("circuit_breaker_state_changed", "warning"),
        ("circuit_breaker_state_changed", "info"),
        ("circuit_breaker_state_changed", "info"),
    ]
    failed = logs[0]
    assert failed["breaker"] == "db"
    assert failed["error_type"] == "ConnectionError"
    assert "hunter2" not in str(logs)
    assert "app:***@db1" in failed["error"]
    opened = logs[2]
    assert (opened["from_state"], opened["to_state"], opened["open_for"]) == ("closed", "open", 5)


class _Internal(ConnectionError):
    """A private error class, as integrations use internally."""


async def test_logs_and_messages_name_the_public_error_type_of_a_private_class() -> None:
    """error_type is the nearest public class (ConnectionError), never an internal _Name."""
    hook = StructlogHook(structlog.get_logger("test"))
    breaker = CircuitBreaker(name="db", failure_threshold=5, hooks=[hook])
    chain = FallbackChain(lambda: "degraded", name="chain", hooks=[hook])

    async def down() -> str:
        raise _Internal("not sent: connection refused")

    with capture_logs() as logs:
        with pytest.raises(ConnectionError):
            await breaker.call(down)
        assert await chain.call(down) == "degraded"
    assert [line["error_type"] for line in logs] == ["ConnectionError", "ConnectionError"]
    assert "_Internal" not in str(logs)
    error = ServiceUnavailableError("chain", ["primary"], [_Internal("x")])
    assert str(error) == "service 'chain' is temporarily unavailable (primary: ConnectionError: x)"


def test_an_error_class_of_a_private_module_that_no_package_exports_is_not_named() -> None:
    """A class users cannot import (the PostgreSQL client's internal NotSent) is logged as its
    nearest importable base; re-exported classes keep their own name."""
    from veritas_resilience.errors import public_type_name
    from veritas_resilience.postgres import ConnectionLostError
    from veritas_resilience.postgres._errors import NotSent

    assert public_type_name(NotSent("connect")) == "Exception"
    lost = ConnectionLostError(client="db", node="db1:5432")
    assert public_type_name(lost) == "ConnectionLostError"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://app:s3cret@db1:5432/app", "postgresql://app:***@db1:5432/app"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("host=db1 password=s3cret user=app", "host=db1 password=*** user=app"),
        ("{'password': 'two words'}", "{'password': '***'}"),
        ("postgresql://app@db1/app", "postgresql://app@db1/app"),
        ("requirepass s3cret", "requirepass ***"),
        ("sentinel auth-pass mymaster s3cret", "sentinel auth-pass mymaster ***"),
        ("masterauth=s3cret", "masterauth=***"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    """Passwords in URLs, DSNs and key=value text are replaced; the rest is kept."""
    assert redact(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("password=abc'", "password=***'"),
        ("dsn='host=db1 password=abc' user=app", "dsn='host=db1 password=***' user=app"),
        ('dsn="host=db1 password=abc", retry', 'dsn="host=db1 password=***", retry'),
        ("connect(password=abc)", "connect(password=***)"),
        ("password=pa'ss host=db1", "password=*** host=db1"),
    ],
)
def test_redact_keeps_the_quote_that_closes_an_enclosing_string(text: str, expected: str) -> None:
    """An unquoted password ends before the quote closing the string around it, which stays."""
    assert redact(text) == expected
