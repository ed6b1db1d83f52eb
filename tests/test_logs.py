from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from urllib.parse import quote, quote_plus

import pytest

from bot import logs
from bot.logs import RedactingFilter, add_secret, redact, setup_logging

# Has characters that URL encoding changes ("/", "+", "=").
TOKEN = "MTIzNDU2Nzg5MDEy.Gh/Ij+Kl=.abcdefghijklmnopqrstuvwxyz0123456789"
OTHER = "second-secret-value-XYZ"


@pytest.fixture(autouse=True)
def clean_logging() -> Iterator[None]:
    """Give each test a fresh secret registry and restore the root/discord loggers."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    discord_level = logging.getLogger("discord").level
    logs._clear_secrets()
    yield
    for handler in list(root.handlers):
        if handler not in saved_handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(saved_level)
    logging.getLogger("discord").setLevel(discord_level)
    logs._clear_secrets()


class Stderr:
    """What the handlers write to stderr during the test (pytest's capture)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys
        self._seen = ""

    def getvalue(self) -> str:
        self._seen += self._capsys.readouterr().err
        return self._seen


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Stderr:
    return Stderr(capsys)


def ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_fluxbot", False)]


# --------------------------------------------------------------------------
# redact / add_secret


def test_redact_without_secrets_is_identity() -> None:
    assert redact(f"token {TOKEN}") == f"token {TOKEN}"


def test_redact_raw_and_url_encoded_forms() -> None:
    add_secret(TOKEN)
    assert quote(TOKEN, safe="") != TOKEN and quote_plus(TOKEN) != TOKEN
    for form in (TOKEN, quote(TOKEN), quote(TOKEN, safe=""), quote_plus(TOKEN), quote(TOKEN, safe="").lower()):
        out = redact(f"GET https://x/?t={form}&a=1")
        assert out == "GET https://x/?t=[REDACTED]&a=1", form


def test_several_secrets_and_repeats() -> None:
    add_secret(TOKEN)
    add_secret(OTHER)
    add_secret(TOKEN)
    assert redact(f"{TOKEN} {OTHER} {TOKEN}") == "[REDACTED] [REDACTED] [REDACTED]"


@pytest.mark.parametrize("value", ["", "   ", "short", "1234567", None, 12345678])
def test_empty_short_or_non_string_secrets_are_ignored(value: object) -> None:
    add_secret(value)  # type: ignore[arg-type]
    assert redact("short 1234567 12345678 text") == "short 1234567 12345678 text"


def test_secret_is_stripped_and_eight_chars_is_enough() -> None:
    add_secret("  12345678\n")
    assert redact("a 12345678 b") == "a [REDACTED] b"


# --------------------------------------------------------------------------
# setup_logging + RedactingFilter, scanning the handler's output


def test_setup_logging_installs_one_redacting_stderr_handler(stderr: Stderr) -> None:
    setup_logging("INFO", secrets=[TOKEN])
    setup_logging("INFO", secrets=[TOKEN])  # again: still one handler
    (handler,) = ours()
    assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr
    assert any(isinstance(f, RedactingFilter) for f in handler.filters)
    assert logging.getLogger().level == logging.INFO
    logging.getLogger("fluxbot.test").info("hello %s", "world")
    line = stderr.getvalue().strip()
    assert line.endswith("INFO    fluxbot.test: hello world")
    assert line.count("\n") == 0


def test_discord_logger_level(stderr: Stderr) -> None:
    setup_logging("INFO")
    assert logging.getLogger("discord").level == logging.WARNING
    logging.getLogger("discord.gateway").info("noise")
    logging.getLogger("discord.gateway").warning("kept")
    assert "noise" not in stderr.getvalue() and "kept" in stderr.getvalue()
    setup_logging("debug")
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("discord").level == logging.DEBUG
    logging.getLogger("discord.gateway").debug("details")
    assert "details" in stderr.getvalue()


def test_bad_level() -> None:
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        setup_logging("LOUD")


def test_percent_args(stderr: Stderr) -> None:
    setup_logging(secrets=[TOKEN])
    logging.getLogger("fluxbot.test").warning("login with %s failed (%d)", TOKEN, 401)
    logging.getLogger("fluxbot.test").warning("as dict: %(tok)s", {"tok": TOKEN})
    out = stderr.getvalue()
    assert TOKEN not in out
    assert "login with [REDACTED] failed (401)" in out
    assert "as dict: [REDACTED]" in out


def test_f_string_and_url_encoded(stderr: Stderr) -> None:
    setup_logging(secrets=[TOKEN])
    log = logging.getLogger("fluxbot.test")
    log.error(f"token is {TOKEN}")
    log.error("url https://discord.com/api?token=%s", quote_plus(TOKEN))
    log.error(f"path /a/{quote(TOKEN, safe='')}/b")
    out = stderr.getvalue()
    assert TOKEN not in out
    assert quote_plus(TOKEN) not in out and quote(TOKEN, safe="") not in out
    assert out.count("[REDACTED]") == 3


def test_secret_added_after_setup(stderr: Stderr) -> None:
    setup_logging()
    log = logging.getLogger("fluxbot.test")
    log.info("before %s", "nothing")
    add_secret(TOKEN)
    log.info("after %s", TOKEN)
    assert TOKEN not in stderr.getvalue()
    assert "after [REDACTED]" in stderr.getvalue()


def test_exception_text(stderr: Stderr) -> None:
    setup_logging(secrets=[TOKEN])
    log = logging.getLogger("fluxbot.test")
    try:
        try:
            raise KeyError(f"inner {TOKEN}")
        except KeyError as inner:
            raise RuntimeError(f"login failed for token {TOKEN}") from inner
    except RuntimeError:
        log.exception("request failed")
    out = stderr.getvalue()
    assert TOKEN not in out
    assert "Traceback (most recent call last)" in out
    assert "RuntimeError: login failed for token [REDACTED]" in out
    assert "KeyError: 'inner [REDACTED]'" in out


def test_exception_record_is_rewritten_for_every_handler(stderr: Stderr) -> None:
    setup_logging(secrets=[TOKEN])
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    root = logging.getLogger()
    keep = Keep()
    root.addHandler(keep)  # after ours, so it sees the rewritten record
    try:
        raise ValueError(TOKEN)
    except ValueError as e:
        logging.getLogger("fluxbot.test").error("boom", exc_info=e)
    finally:
        root.removeHandler(keep)
    (record,) = seen
    assert record.exc_info is None
    assert record.exc_text is not None and "ValueError: [REDACTED]" in record.exc_text
    assert TOKEN not in logging.Formatter().format(record)


def test_stack_info(stderr: Stderr) -> None:
    setup_logging(secrets=[TOKEN])

    def deep(marker: str) -> None:
        logging.getLogger("fluxbot.test").info("here", stack_info=True)

    deep(TOKEN)  # the stack shows source lines, not values; still must be clean
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None, sinfo=f"Stack: {TOKEN}")
    ours()[0].handle(record)
    out = stderr.getvalue()
    assert "Stack (most recent call last)" in out
    assert TOKEN not in out
    assert "Stack: [REDACTED]" in out


def test_bad_format_arguments_do_not_leak(stderr: Stderr, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging, "raiseExceptions", True)
    setup_logging(secrets=[TOKEN])
    # Only our handler: pytest's own log capture would raise on the bad record.
    log = logging.getLogger("fluxbot.test.isolated")
    log.propagate = False
    log.addHandler(ours()[0])
    try:
        log.error("two %s %s", TOKEN)  # one argument short
    finally:
        log.removeHandler(ours()[0])
        log.propagate = True
    out = stderr.getvalue()
    assert TOKEN not in out
    assert "Logging error" not in out
    assert "[REDACTED]" in out


def test_non_string_message(stderr: Stderr) -> None:
    setup_logging(secrets=[TOKEN])

    class Thing:
        def __str__(self) -> str:
            return f"thing with {TOKEN}"

    logging.getLogger("fluxbot.test").warning(Thing())
    assert TOKEN not in stderr.getvalue()
    assert "thing with [REDACTED]" in stderr.getvalue()


def test_records_without_secrets_are_untouched() -> None:
    add_secret(TOKEN)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "n=%d", (5,), None)
    assert RedactingFilter().filter(record) is True
    assert (record.msg, record.args) == ("n=%d", (5,))


def test_filter_never_drops_and_uses_its_own_secrets(stderr: Stderr) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter(secrets=[OTHER]))
    log = logging.getLogger("fluxbot.test.own")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("a %s", OTHER)
        log.warning("b %s", "plain")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert stderr.getvalue().splitlines() == ["a [REDACTED]", "b plain"]
    assert redact(OTHER) == OTHER  # the instance's secrets are not global


def test_redaction_failure_hides_the_record_but_keeps_it(stderr: Stderr) -> None:
    setup_logging(secrets=[TOKEN])

    class Evil:
        def __str__(self) -> str:
            raise RuntimeError(TOKEN)

    record = logging.LogRecord("x", logging.ERROR, __file__, 1, Evil(), None, None)
    assert RedactingFilter().filter(record) is True
    assert record.getMessage() == "[log record could not be redacted]"


# --------------------------------------------------------------------------
# network failures logged by libraries


def _log_reconnect(exc: BaseException) -> None:
    try:
        raise exc
    except BaseException:
        logging.getLogger("discord.client").exception("Attempting a reconnect in %.2fs", 4.0)


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError(104, "Connection reset by peer"),
        OSError(-3, "Temporary failure in name resolution"),
        TimeoutError(),
    ],
)
def test_a_network_failure_is_one_line_without_its_traceback(stderr: Stderr, exc: BaseException) -> None:
    setup_logging("INFO")
    _log_reconnect(exc)
    lines = stderr.getvalue().strip().splitlines()
    assert len(lines) == 1 and "Attempting a reconnect in 4.00s" in lines[0], lines
    assert type(exc).__name__ in lines[0] and "Traceback" not in lines[0]


def test_debug_keeps_network_tracebacks_and_other_errors_keep_theirs(stderr: Stderr) -> None:
    setup_logging("DEBUG")
    _log_reconnect(ConnectionResetError(104, "Connection reset by peer"))
    assert "Traceback" in stderr.getvalue()
    setup_logging("INFO")
    try:
        raise KeyError("not the network")
    except KeyError:
        logging.getLogger("fluxbot").exception("a bug")
    assert stderr.getvalue().count("Traceback") == 2
