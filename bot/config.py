"""Configuration: a TOML file -> typed, frozen settings.

Every section and key is optional; a bad key or value stops start-up with a
:class:`ConfigError` that names it (``[queue] max_size: ...``). Nothing falls
back to defaults silently. The bot token is held in a :class:`Secret` and never
appears in a ``repr``, ``str`` or error message.
"""

from __future__ import annotations

import dataclasses
import difflib
import hmac
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "DiscordSettings",
    "GenerationSettings",
    "JobSettings",
    "MetricsSettings",
    "ModelSettings",
    "ModerationSettings",
    "QueueSettings",
    "QuotaSettings",
    "Secret",
    "Settings",
    "StorageSettings",
    "TOKEN_ENV",
    "default_settings",
    "load_settings",
]

log = logging.getLogger("fluxbot.config")

TOKEN_ENV = "DISCORD_TOKEN"
_EXAMPLE = "config.example.toml"
_REDACTED = "[REDACTED]"


class ConfigError(Exception):
    """A bad configuration. The message names the offending key (``[section] key``)."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class Secret:
    """A string that never shows itself in ``repr``/``str``; ``get()`` returns it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Secret holds a str, got {type(value).__name__}")
        self._value = value

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        # Lets the frozen settings dataclasses be hashed; reveals nothing usable.
        return hash((Secret, self._value))

    def __reduce__(self) -> Any:  # keep copy/deepcopy/pickle working with __slots__
        return (Secret, (self._value,))


# --------------------------------------------------------------------------
# Validators: (section, key, value) -> normalised value, or ConfigError.
# They are idempotent, so a dataclass re-validates itself in __post_init__.

_Check = Callable[[str, str, Any], Any]


def _fail(section: str, key: str, expected: str, got: Any) -> ConfigError:
    name = f"[{section}] {key}"
    return ConfigError(f"{name}: must be {expected}, got {got!r}", key=name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(lo: int, hi: int | None = None) -> _Check:
    expected = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"

    def check(section: str, key: str, value: Any) -> int:
        if not _is_int(value) or value < lo or (hi is not None and value > hi):
            raise _fail(section, key, expected, value)
        return int(value)

    return check


def _listen(section: str, key: str, value: Any) -> str:
    """ "" (off) or "host:port", e.g. "127.0.0.1:9464" or "0.0.0.0:9464"."""
    expected = 'a "host:port" string such as "127.0.0.1:9464", or "" for off'
    if not isinstance(value, str):
        raise _fail(section, key, expected, value)
    text = value.strip()
    if not text:
        return ""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _fail(section, key, expected, value)
    return f"{host}:{int(port)}"


def _dimension(lo: int, hi: int, step: int) -> _Check:
    expected = f"a multiple of {step} from {lo} to {hi}"

    def check(section: str, key: str, value: Any) -> int:
        if not _is_int(value) or not lo <= value <= hi or value % step:
            raise _fail(section, key, expected, value)
        return int(value)

    return check


def _number(lo: float, hi: float) -> _Check:
    expected = f"a number from {lo:g} to {hi:g}"

    def check(section: str, key: str, value: Any) -> float:
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or not lo <= value <= hi
        ):
            raise _fail(section, key, expected, value)
        return float(value)

    return check


def _choice(*allowed: str) -> _Check:
    expected = "one of " + ", ".join(repr(a) for a in allowed)

    def check(section: str, key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise _fail(section, key, expected, value)
        return value

    return check


_CUDA_N = re.compile(r"cuda:[0-9]+")


def _device(section: str, key: str, value: Any) -> str:
    if isinstance(value, str) and (value in ("auto", "cuda", "cpu") or _CUDA_N.fullmatch(value)):
        return value
    raise _fail(section, key, "one of 'auto', 'cuda', 'cpu', 'cuda:N' (N = card index)", value)


def _bool(section: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(section, key, "true or false", value)
    return value


def _vram(section: str, key: str, value: Any) -> float | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    raise _fail(section, key, "'auto' or a number of GiB > 0", value)


def _path(section: str, key: str, value: Any) -> Path:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise _fail(section, key, "a non-empty path string", value)
    return Path(value).expanduser()


_DIGITS = re.compile(r"[0-9]+")
_MAX_SNOWFLAKE = 2**64 - 1


def _ids(section: str, key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise _fail(section, key, "a list of Discord ids (integers or strings of digits)", value)
    out: list[int] = []
    for i, item in enumerate(value):
        if isinstance(item, str) and _DIGITS.fullmatch(item.strip()):
            item = int(item.strip())
        if not _is_int(item) or not 0 < item <= _MAX_SNOWFLAKE:
            raise _fail(section, f"{key}[{i}]", "a Discord id (a positive integer or a string of digits)", item)
        out.append(int(item))
    return tuple(out)


def _terms(section: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise _fail(section, key, "a list of strings", value)
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise _fail(section, f"{key}[{i}]", "a non-empty string", item)
    return tuple(value)


def token_problem(text: str) -> str | None:
    """What is wrong with a token's text, never quoting it; None when it can be a token.

    A line break or space inside (a copy-paste slip) would otherwise fail deep in the HTTP client
    with a traceback."""
    if any(c.isspace() or not c.isprintable() for c in text):
        return "contains a line break, space or control character: paste the token again as one line"
    return None


def _token(section: str, key: str, value: Any) -> Secret:
    # Never echo the value: it may be the token itself.
    if isinstance(value, Secret):
        return value
    if isinstance(value, str):
        problem = token_problem(value.strip())
        if problem:
            name = f"[{section}] {key}"
            raise ConfigError(f"{name}: {problem}", key=name)
        return Secret(value.strip())
    name = f"[{section}] {key}"
    raise ConfigError(f"{name}: must be a string, got a value of type {type(value).__name__}", key=name)


def _opt(default: Any, check: _Check, *, path: bool = False) -> Any:
    return field(default=default, metadata={"check": check, "path": path})


class _Section:
    """Validates and normalises every field (from its metadata) after construction."""

    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(self.SECTION, f.name, getattr(self, f.name)))
        self._check_together()

    def _check_together(self) -> None:
        """Rules that span several fields of the section."""


# --------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class DiscordSettings(_Section):
    SECTION: ClassVar[str] = "discord"
    token: Secret = field(default_factory=lambda: Secret(""), metadata={"check": _token})
    guild_ids: tuple[int, ...] = _opt((), _ids)
    admin_user_ids: tuple[int, ...] = _opt((), _ids)
    # Servers whose members with Manage Server are admins. Empty: those in guild_ids. Quotas are
    # the bot's, across every server it is in, so a server outside these confers no rights at all.
    admin_guild_ids: tuple[int, ...] = _opt((), _ids)
    # Progress edits carry a small live preview of the image being painted (members may turn theirs off).
    previews: bool = _opt(True, _bool)

    @property
    def home_guild_ids(self) -> tuple[int, ...]:
        """The servers where Manage Server makes a member an admin of this bot."""
        return self.admin_guild_ids or self.guild_ids


@dataclass(frozen=True)
class ModelSettings(_Section):
    SECTION: ClassVar[str] = "model"
    preset: str = _opt("majicflus", _choice("majicflus", "tiny-random"))
    dir: Path = _opt(Path("models"), _path, path=True)
    # None = size it from the card ("auto" in TOML); a number = GiB budget for the whole process.
    vram_limit_gb: float | None = _opt(8.0, _vram)
    device: str = _opt("auto", _device)
    fp8_matmul: str = _opt("auto", _choice("auto", "on", "off"))
    fast_accum: str = _opt("auto", _choice("auto", "on", "off"))
    keep_resident: str = _opt("auto", _choice("auto", "on", "off"))
    compile: str = _opt("auto", _choice("auto", "on", "off"))
    compile_cache: Path = _opt(Path("~/.cache/fluxbot/compile").expanduser(), _path, path=True)
    cuda_graphs: str = _opt("auto", _choice("auto", "on", "off"))
    fused_attention: str = _opt("auto", _choice("auto", "on", "off"))
    t5_fp8: bool = _opt(False, _bool)
    t5_in_ram: str = _opt("auto", _choice("auto", "on", "off"))


@dataclass(frozen=True)
class GenerationSettings(_Section):
    SECTION: ClassVar[str] = "generation"
    default_steps: int = _opt(20, _int(1, 50))
    max_steps: int = _opt(50, _int(1, 50))
    width: int = _opt(1024, _dimension(256, 2048, 16))
    height: int = _opt(1024, _dimension(256, 2048, 16))
    max_prompt_chars: int = _opt(1000, _int(1, 4000))
    guidance: float = _opt(3.5, _number(0, 20))
    # The result buttons' img2img passes: the denoising strength each starts from (1 = from noise,
    # lower keeps more of the image). Vary (Subtle) / (Strong) as a ComfyUI FLUX bot does, Upscale low.
    vary_subtle_strength: float = _opt(0.48, _number(0.05, 1))
    vary_strong_strength: float = _opt(0.75, _number(0.05, 1))
    upscale_strength: float = _opt(0.3, _number(0.05, 1))

    def _check_together(self) -> None:
        if self.default_steps > self.max_steps:
            raise _fail(
                self.SECTION, "default_steps", f"an integer from 1 to max_steps ({self.max_steps})", self.default_steps
            )


@dataclass(frozen=True)
class QuotaSettings(_Section):
    SECTION: ClassVar[str] = "quota"
    daily_limit: int = _opt(20, _int(0))
    # Relax mode: a member whose quota is used up may still queue images, free, painted only when no
    # charged job waits (a limit of 0 stays a ban: it has no quota to use up).
    relax: bool = _opt(False, _bool)


@dataclass(frozen=True)
class QueueSettings(_Section):
    SECTION: ClassVar[str] = "queue"
    max_size: int = _opt(100, _int(1))
    max_per_user: int = _opt(3, _int(1))

    def _check_together(self) -> None:
        if self.max_per_user > self.max_size:
            raise _fail(
                self.SECTION, "max_per_user", f"an integer from 1 to max_size ({self.max_size})", self.max_per_user
            )


@dataclass(frozen=True)
class StorageSettings(_Section):
    SECTION: ClassVar[str] = "storage"
    database: Path = _opt(Path("fluxbot.db"), _path, path=True)
    results_dir: Path = _opt(Path("results"), _path, path=True)


@dataclass(frozen=True)
class ModerationSettings(_Section):
    SECTION: ClassVar[str] = "moderation"
    blocked_terms: tuple[str, ...] = _opt((), _terms)


@dataclass(frozen=True)
class JobSettings(_Section):
    SECTION: ClassVar[str] = "jobs"
    max_attempts: int = _opt(3, _int(1))


@dataclass(frozen=True)
class MetricsSettings(_Section):
    SECTION: ClassVar[str] = "metrics"
    # Prometheus text at /metrics and the health check at /health; "" turns the listener off.
    listen: str = _opt("127.0.0.1:9464", _listen)

    @property
    def address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Settings:
    discord: DiscordSettings
    model: ModelSettings
    generation: GenerationSettings
    quota: QuotaSettings
    queue: QueueSettings
    storage: StorageSettings
    moderation: ModerationSettings
    jobs: JobSettings
    metrics: MetricsSettings = field(default_factory=lambda: MetricsSettings())
    source: Path | None = None  # the file it came from (absolute)


_SECTIONS: dict[str, type[_Section]] = {
    "discord": DiscordSettings,
    "model": ModelSettings,
    "generation": GenerationSettings,
    "quota": QuotaSettings,
    "queue": QueueSettings,
    "storage": StorageSettings,
    "moderation": ModerationSettings,
    "jobs": JobSettings,
    "metrics": MetricsSettings,
}


# --------------------------------------------------------------------------
# Loading


def _hint(name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _section_keys(cls: type[_Section]) -> list[str]:
    return [f.name for f in fields(cls)]  # type: ignore[arg-type]


def _check_names(raw: Mapping[str, Any]) -> None:
    sections = list(_SECTIONS)
    for name, value in raw.items():
        if name in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"[{name}]: must be a table (a [{name}] section), got a value of type {type(value).__name__}",
                    key=f"[{name}]",
                )
            keys = _section_keys(_SECTIONS[name])
            for key in value:
                if key not in keys:
                    raise ConfigError(
                        f"[{name}] {key}: unknown key{_hint(key, keys)}; allowed keys in [{name}]: {', '.join(keys)}",
                        key=f"[{name}] {key}",
                    )
            continue
        if isinstance(value, Mapping):
            raise ConfigError(
                f"[{name}]: unknown section{_hint(name, sections)}; allowed sections: {', '.join(sections)}",
                key=f"[{name}]",
            )
        owners = [s for s, cls in _SECTIONS.items() if name in _section_keys(cls)]
        where = f" (did you mean [{owners[0]}] {name}?)" if owners else ""
        raise ConfigError(
            f"{name}: keys belong inside a section{where}; allowed sections: {', '.join(sections)}", key=name
        )


def _resolve(section: _Section, base: Path) -> _Section:
    changes = {}
    for f in fields(section):  # type: ignore[arg-type]
        if f.metadata.get("path"):
            value: Path = getattr(section, f.name)
            if not value.is_absolute():
                changes[f.name] = base / value
    return dataclasses.replace(section, **changes) if changes else section  # type: ignore[type-var]


def _build(raw: Mapping[str, Any], *, base: Path, source: Path | None, env_token: str, require_token: bool) -> Settings:
    _check_names(raw)
    built: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        built[name] = _resolve(cls(**raw.get(name, {})), base)
    discord: DiscordSettings = built["discord"]
    if env_token:
        problem = token_problem(env_token)
        if problem:
            raise ConfigError(f"{TOKEN_ENV}: {problem}", key=TOKEN_ENV)
        discord = dataclasses.replace(discord, token=Secret(env_token))
    if require_token and not discord.token:
        raise ConfigError(f"[discord] token: no bot token: set {TOKEN_ENV} or [discord] token", key="[discord] token")
    built["discord"] = discord
    return Settings(**built, source=source)


_TOML_POS = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (copy {_EXAMPLE})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        pos = _TOML_POS.search(message)
        if pos:
            where = f"line {pos.group(1)}, column {pos.group(2)}"
            message = message[: pos.start()]
            raise ConfigError(f"{path}: invalid TOML at {where}: {message}") from None
        raise ConfigError(f"{path}: invalid TOML: {message}") from None


def _file_token(raw: Mapping[str, Any]) -> str:
    discord = raw.get("discord")
    token = discord.get("token") if isinstance(discord, Mapping) else None
    return token.strip() if isinstance(token, str) else ""


def _warn_if_readable(path: Path) -> None:
    if os.name != "posix":
        return
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning(
            "config file %s holds the bot token and other users can read it (mode %03o); run: chmod 600 %s",
            path,
            mode & 0o777,
            path,
        )


def _scrub(error: ConfigError, secrets: list[str]) -> ConfigError:
    message = str(error)
    for secret in secrets:
        if secret:
            message = message.replace(secret, _REDACTED)
    return ConfigError(message, key=error.key)


def load_settings(
    path: str | os.PathLike[str] | None,
    *,
    env: Mapping[str, str] | None = None,
    require_token: bool = False,
) -> Settings:
    """Load settings from ``path`` (or defaults when ``path`` is None).

    ``env`` defaults to ``os.environ``; a non-empty ``DISCORD_TOKEN`` there wins
    over ``[discord] token``. Relative paths are resolved against the file's
    directory (the current directory when there is no file).
    """
    environ = os.environ if env is None else env
    env_token = (environ.get(TOKEN_ENV) or "").strip()
    secrets = [env_token]
    try:
        if path is None:
            raw: dict[str, Any] = {}
            source = None
            base = Path.cwd()
        else:
            given = Path(path)
            raw = _read(given)
            source = Path(os.path.abspath(given))
            base = source.parent
            file_token = _file_token(raw)
            secrets.append(file_token)
            if file_token:
                _warn_if_readable(given)
        return _build(raw, base=base, source=source, env_token=env_token, require_token=require_token)
    except ConfigError as e:
        raise _scrub(e, secrets) from None


def default_settings(**overrides: Any) -> Settings:
    """Defaults (paths resolved against the current directory; the environment is not read).

    Each override is a section name with either a settings object (used as is)
    or a mapping of TOML-style values (validated like a file), or ``source``.
    """
    raw: dict[str, Any] = {}
    ready: dict[str, Any] = {}
    for name, value in overrides.items():
        if name == "source":
            ready[name] = None if value is None else Path(value)
        elif name not in _SECTIONS:
            raise TypeError(f"default_settings: unknown section {name!r}; allowed: {', '.join(_SECTIONS)}, source")
        elif isinstance(value, _SECTIONS[name]):
            ready[name] = value
        elif isinstance(value, Mapping):
            raw[name] = dict(value)
        else:
            raise TypeError(
                f"default_settings: {name} must be a {_SECTIONS[name].__name__} or a mapping, got {type(value).__name__}"
            )
    settings = _build(raw, base=Path.cwd(), source=None, env_token="", require_token=False)
    return dataclasses.replace(settings, **ready) if ready else settings
