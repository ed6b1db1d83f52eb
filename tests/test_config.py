from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest

from bot import config as config_module
from bot.config import (
    ConfigError,
    DiscordSettings,
    GenerationSettings,
    JobSettings,
    ModelSettings,
    ModerationSettings,
    QueueSettings,
    QuotaSettings,
    Secret,
    Settings,
    StorageSettings,
    default_settings,
    load_settings,
)

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.toml"
TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GhIjKl.abcdefghijklmnopqrstuvwxyz0123456789"
SECTION_CLASSES = config_module._SECTIONS  # every section the loader knows, not a copy of the list


def write(tmp_path: Path, text: str, name: str = "config.toml", mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    path.chmod(mode)
    return path


# --------------------------------------------------------------------------
# Defaults and a full file


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(None, env={})
    assert s.source is None
    assert s.discord == DiscordSettings(token=Secret(""))
    assert not s.discord.token
    assert s.discord.previews is True  # live previews on progress edits
    assert s.model == ModelSettings(dir=tmp_path / "models")
    assert s.model.preset == "majicflus"
    assert s.model.vram_limit_gb == 8.0
    assert (
        s.model.device,
        s.model.fp8_matmul,
        s.model.fast_accum,
        s.model.keep_resident,
        s.model.compile,
        s.model.cuda_graphs,
        s.model.fused_attention,
    ) == ("auto",) * 7
    assert s.model.t5_fp8 is False
    assert s.generation == GenerationSettings(
        default_steps=20, max_steps=50, width=1024, height=1024, max_prompt_chars=1000, guidance=3.5
    )
    assert s.quota.daily_limit == 20
    assert (s.queue.max_size, s.queue.max_per_user) == (100, 3)
    assert s.storage == StorageSettings(database=tmp_path / "fluxbot.db", results_dir=tmp_path / "results")
    assert s.moderation.blocked_terms == ()
    assert s.jobs.max_attempts == 3
    assert default_settings() == s


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    s = load_settings(path, env={})
    assert s.source == path
    assert dataclasses.replace(s, source=None) == dataclasses.replace(
        default_settings(
            model={"dir": str(tmp_path / "models")},
            storage={"database": str(tmp_path / "fluxbot.db"), "results_dir": str(tmp_path / "results")},
        )
    )


FULL = """\
    [discord]
    token = "{token}"
    guild_ids = [123456789012345678, "876543210987654321"]
    admin_user_ids = ["42"]
    previews = false

    [model]
    preset = "tiny-random"
    dir = "/srv/weights"
    vram_limit_gb = "auto"
    device = "cuda:1"
    fp8_matmul = "on"
    fast_accum = "off"
    keep_resident = "off"
    compile = "off"
    cuda_graphs = "on"
    fused_attention = "off"
    t5_fp8 = true

    [generation]
    default_steps = 8
    max_steps = 30
    width = 768
    height = 1344
    max_prompt_chars = 500
    guidance = 4

    [quota]
    daily_limit = 0

    [queue]
    max_size = 10
    max_per_user = 10

    [storage]
    database = "data/bot.sqlite"
    results_dir = "/var/fluxbot/results"

    [moderation]
    blocked_terms = ["gore", "nsfw"]

    [jobs]
    max_attempts = 1
"""


def test_full_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL.format(token=TOKEN))
    s = load_settings(path, env={})
    assert s == Settings(
        discord=DiscordSettings(
            token=Secret(TOKEN),
            guild_ids=(123456789012345678, 876543210987654321),
            admin_user_ids=(42,),
            previews=False,
        ),
        model=ModelSettings(
            preset="tiny-random",
            dir=Path("/srv/weights"),
            vram_limit_gb=None,
            device="cuda:1",
            fp8_matmul="on",
            fast_accum="off",
            keep_resident="off",
            compile="off",
            cuda_graphs="on",
            fused_attention="off",
            t5_fp8=True,
        ),
        generation=GenerationSettings(
            default_steps=8, max_steps=30, width=768, height=1344, max_prompt_chars=500, guidance=4.0
        ),
        quota=QuotaSettings(daily_limit=0),
        queue=QueueSettings(max_size=10, max_per_user=10),
        storage=StorageSettings(database=tmp_path / "data" / "bot.sqlite", results_dir=Path("/var/fluxbot/results")),
        moderation=ModerationSettings(blocked_terms=("gore", "nsfw")),
        jobs=JobSettings(max_attempts=1),
        source=path,
    )
    assert s.discord.token.get() == TOKEN
    assert isinstance(s.generation.guidance, float)
    assert isinstance(s.discord.guild_ids, tuple)


def test_settings_are_frozen() -> None:
    s = default_settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.queue.max_size = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.queue = QueueSettings()  # type: ignore[misc]


@pytest.mark.parametrize("value", [0.5, 12, 7.5])
def test_vram_limit_numbers_become_floats(tmp_path: Path, value: float) -> None:
    s = load_settings(write(tmp_path, f"[model]\nvram_limit_gb = {value}\n"), env={})
    assert s.model.vram_limit_gb == float(value)
    assert isinstance(s.model.vram_limit_gb, float)


@pytest.mark.parametrize("device", ["auto", "cuda", "cpu", "cuda:0", "cuda:12"])
def test_devices(tmp_path: Path, device: str) -> None:
    assert load_settings(write(tmp_path, f'[model]\ndevice = "{device}"\n'), env={}).model.device == device


def test_dotted_keys_work(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "queue.max_size = 7\nqueue.max_per_user = 2\n"), env={})
    assert s.queue == QueueSettings(max_size=7, max_per_user=2)


# --------------------------------------------------------------------------
# Bad configurations: one table, every error category


BAD = [
    # (id, file text, fragments the message must contain)
    (
        "unknown section",
        "[modle]\npreset = 'tiny-random'\n",
        ["[modle]", "unknown section", "did you mean 'model'", "discord, model, generation"],
    ),
    (
        "unknown key",
        "[queue]\nmax_sise = 5\n",
        ["[queue] max_sise", "unknown key", "did you mean 'max_size'", "max_size, max_per_user"],
    ),
    (
        "unknown key in discord",
        "[discord]\nbot_token = 'x'\n",
        ["[discord] bot_token", "token, guild_ids, admin_user_ids"],
    ),
    ("top-level key", "max_size = 5\n", ["max_size", "inside a section", "[queue] max_size"]),
    ("section not a table", "queue = 5\n", ["[queue]", "must be a table", "int"]),
    ("string for int", "[queue]\nmax_size = 'ten'\n", ["[queue] max_size: must be an integer >= 1, got 'ten'"]),
    ("float for int", "[jobs]\nmax_attempts = 2.0\n", ["[jobs] max_attempts", "integer >= 1", "got 2.0"]),
    ("bool for int", "[quota]\ndaily_limit = true\n", ["[quota] daily_limit", "integer >= 0", "got True"]),
    ("string for bool", "[model]\nt5_fp8 = 'yes'\n", ["[model] t5_fp8", "true or false", "got 'yes'"]),
    ("int for bool", "[model]\nt5_fp8 = 1\n", ["[model] t5_fp8", "true or false", "got 1"]),
    ("string for previews", "[discord]\npreviews = 'off'\n", ["[discord] previews", "true or false", "got 'off'"]),
    (
        "string for float",
        "[generation]\nguidance = 'high'\n",
        ["[generation] guidance", "number from 0 to 20", "got 'high'"],
    ),
    ("bool for float", "[generation]\nguidance = false\n", ["[generation] guidance", "got False"]),
    ("nan float", "[generation]\nguidance = nan\n", ["[generation] guidance", "got nan"]),
    ("int for path", "[storage]\ndatabase = 5\n", ["[storage] database", "path", "got 5"]),
    ("empty path", "[model]\ndir = ''\n", ["[model] dir", "non-empty path", "got ''"]),
    (
        "scalar for list",
        "[moderation]\nblocked_terms = 'gore'\n",
        ["[moderation] blocked_terms", "list of strings", "got 'gore'"],
    ),
    (
        "bad list item",
        "[moderation]\nblocked_terms = ['gore', 3]\n",
        ["[moderation] blocked_terms[1]", "non-empty string", "got 3"],
    ),
    (
        "blank list item",
        "[moderation]\nblocked_terms = ['  ']\n",
        ["[moderation] blocked_terms[0]", "non-empty string"],
    ),
    ("scalar for ids", "[discord]\nguild_ids = 123\n", ["[discord] guild_ids", "list of Discord ids", "got 123"]),
    (
        "non-digit id",
        "[discord]\nadmin_user_ids = ['12ab']\n",
        ["[discord] admin_user_ids[0]", "Discord id", "got '12ab'"],
    ),
    ("negative id", "[discord]\nguild_ids = [1, -5]\n", ["[discord] guild_ids[1]", "positive integer", "got -5"]),
    ("float id", "[discord]\nguild_ids = [1.5]\n", ["[discord] guild_ids[0]", "got 1.5"]),
    (
        "bad enum preset",
        "[model]\npreset = 'flux-dev'\n",
        ["[model] preset", "one of 'majicflus', 'tiny-random'", "got 'flux-dev'"],
    ),
    ("bad enum lever", "[model]\ncompile = true\n", ["[model] compile", "one of 'auto', 'on', 'off'", "got True"]),
    ("bad enum fp8", "[model]\nfp8_matmul = 'yes'\n", ["[model] fp8_matmul", "'auto', 'on', 'off'"]),
    ("bad enum fast accum", "[model]\nfast_accum = true\n", ["[model] fast_accum", "'auto', 'on', 'off'"]),
    ("bad device", "[model]\ndevice = 'gpu'\n", ["[model] device", "'auto', 'cuda', 'cpu', 'cuda:N'", "got 'gpu'"]),
    ("bad device index", "[model]\ndevice = 'cuda:x'\n", ["[model] device", "got 'cuda:x'"]),
    ("vram zero", "[model]\nvram_limit_gb = 0\n", ["[model] vram_limit_gb", "'auto' or a number of GiB > 0", "got 0"]),
    ("vram word", "[model]\nvram_limit_gb = 'max'\n", ["[model] vram_limit_gb", "'auto'", "got 'max'"]),
    ("vram bool", "[model]\nvram_limit_gb = true\n", ["[model] vram_limit_gb", "got True"]),
    ("max_steps too high", "[generation]\nmax_steps = 51\n", ["[generation] max_steps", "from 1 to 50", "got 51"]),
    (
        "default_steps zero",
        "[generation]\ndefault_steps = 0\n",
        ["[generation] default_steps", "from 1 to 50", "got 0"],
    ),
    (
        "default over max",
        "[generation]\nmax_steps = 10\ndefault_steps = 20\n",
        ["[generation] default_steps", "from 1 to max_steps (10)", "got 20"],
    ),
    (
        "width not multiple of 16",
        "[generation]\nwidth = 1000\n",
        ["[generation] width", "multiple of 16 from 256 to 2048", "got 1000"],
    ),
    ("height too small", "[generation]\nheight = 128\n", ["[generation] height", "from 256 to 2048", "got 128"]),
    ("height too big", "[generation]\nheight = 2064\n", ["[generation] height", "got 2064"]),
    (
        "prompt chars too big",
        "[generation]\nmax_prompt_chars = 4001\n",
        ["[generation] max_prompt_chars", "from 1 to 4000", "got 4001"],
    ),
    ("guidance negative", "[generation]\nguidance = -1.0\n", ["[generation] guidance", "from 0 to 20", "got -1.0"]),
    ("quota negative", "[quota]\ndaily_limit = -1\n", ["[quota] daily_limit", ">= 0", "got -1"]),
    ("queue zero", "[queue]\nmax_size = 0\n", ["[queue] max_size", ">= 1", "got 0"]),
    (
        "per user over size",
        "[queue]\nmax_size = 2\nmax_per_user = 3\n",
        ["[queue] max_per_user", "max_size (2)", "got 3"],
    ),
    ("attempts zero", "[jobs]\nmax_attempts = 0\n", ["[jobs] max_attempts", ">= 1", "got 0"]),
    ("token not a string", "[discord]\ntoken = 12345678901\n", ["[discord] token", "must be a string", "int"]),
]


@pytest.mark.parametrize(("text", "fragments"), [pytest.param(t, f, id=i) for i, t, f in BAD])
def test_bad_config(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_error_carries_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "[queue]\nmax_size = 'ten'\n"), env={})
    assert info.value.key == "[queue] max_size"
    assert str(info.value) == "[queue] max_size: must be an integer >= 1, got 'ten'"


def test_token_not_echoed_when_it_has_the_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "[discord]\ntoken = 98765432109876\n"), env={})
    assert "98765432109876" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert str(info.value) == f"config file not found: {path} (copy config.example.toml)"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path, env={})


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "[queue]\nmax_size = 5\nmax_per_user = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML at line 3, column ")
    assert re.search(r"line 3, column \d+: \S", message)


def test_duplicate_key_is_a_syntax_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"invalid TOML at line 3"):
        load_settings(write(tmp_path, "[queue]\nmax_size = 5\nmax_size = 6\n"), env={})


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"[queue]\nmax_size = 5 # \xff\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_settings(path, env={})


# --------------------------------------------------------------------------
# The token


def test_env_token_wins_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[discord]\ntoken = "file-token-123456"\n')
    assert load_settings(path, env={"DISCORD_TOKEN": "env-token-abcdef"}).discord.token.get() == "env-token-abcdef"
    assert load_settings(path, env={"DISCORD_TOKEN": ""}).discord.token.get() == "file-token-123456"
    assert load_settings(path, env={}).discord.token.get() == "file-token-123456"


def test_env_token_without_a_file() -> None:
    s = load_settings(None, env={"DISCORD_TOKEN": " env-token-abcdef\n"}, require_token=True)
    assert s.discord.token.get() == "env-token-abcdef"


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "from-os-environ-1234")
    assert load_settings(None).discord.token.get() == "from-os-environ-1234"


@pytest.mark.parametrize("text", ["", '[discord]\ntoken = ""\n', '[discord]\ntoken = "   "\n'])
def test_require_token(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert not load_settings(path, env={}).discord.token
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={}, require_token=True)
    assert str(info.value) == "[discord] token: no bot token: set DISCORD_TOKEN or [discord] token"


def test_secret() -> None:
    s = Secret(TOKEN)
    assert s.get() == TOKEN
    assert s
    assert not Secret("")
    assert repr(s) == str(s) == f"{s}" == "Secret('**********')"
    assert repr(Secret("")) == "Secret('')"
    assert s == Secret(TOKEN)
    assert s != Secret(TOKEN + "x")
    assert s != TOKEN
    assert len({s, Secret(TOKEN)}) == 1


def test_token_never_in_repr_or_str(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, FULL.format(token=TOKEN)), env={})
    for text in (repr(s), str(s), repr(s.discord), str(s.discord), f"{s.discord.token}", f"{s!r}"):
        assert TOKEN not in text
    assert "Secret('**********')" in repr(s)
    s = load_settings(None, env={"DISCORD_TOKEN": TOKEN})
    assert TOKEN not in repr(s)


@pytest.mark.parametrize(
    "bad",
    [
        "[queue]\nmax_size = 'ten'\n",
        "[model]\nkeep_resident = 'always'\n",
        "[discord]\nguild_ids = ['{token}']\n",  # the token pasted into the wrong key
        "[discord]\nadmin_user_ids = [1, 'x']\n",
        "[discord]\ntokn = '{token}'\n",
        "[generation]\nwidth = = 3\n",  # syntax error below the token
    ],
)
@pytest.mark.parametrize("from_env", [False, True], ids=["file-token", "env-token"])
def test_token_never_in_error_messages(tmp_path: Path, bad: str, from_env: bool) -> None:
    head = "" if from_env else f'[discord]\ntoken = "{TOKEN}"\n'
    body = bad.format(token=TOKEN)
    if not from_env and body.startswith("[discord]\n"):
        body = body[len("[discord]\n") :]
    path = write(tmp_path, head + body)
    env = {"DISCORD_TOKEN": TOKEN} if from_env else {}
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=env)
    assert TOKEN not in str(info.value)
    assert TOKEN not in repr(info.value)
    assert info.value.__cause__ is None


# --------------------------------------------------------------------------
# Paths


def test_relative_paths_resolve_against_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(conf, '[model]\ndir = "w"\n[storage]\ndatabase = "../db/bot.db"\nresults_dir = "/abs/results"\n')
    s = load_settings(Path("..") / "etc" / "config.toml", env={})
    assert s.model.dir == conf / "w"
    assert s.storage.database == conf / ".." / "db" / "bot.db"
    assert s.storage.results_dir == Path("/abs/results")
    assert s.model.dir.is_absolute() and s.storage.database.is_absolute()
    assert s.source == conf / "config.toml" == path.resolve()


def test_relative_paths_without_a_file_resolve_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(None, env={})
    assert (s.model.dir, s.storage.database, s.storage.results_dir) == (
        tmp_path / "models",
        tmp_path / "fluxbot.db",
        tmp_path / "results",
    )


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    s = load_settings(write(tmp_path, '[model]\ndir = "~/models"\n'), env={})
    assert s.model.dir == tmp_path / "home" / "models"


# --------------------------------------------------------------------------
# File permissions


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_readable_file_with_token_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int) -> None:
    path = write(tmp_path, f'[discord]\ntoken = "{TOKEN}"\n', mode=mode)
    with caplog.at_level(logging.WARNING, logger="fluxbot.config"):
        load_settings(path, env={})
    warnings = [r for r in caplog.records if r.name == "fluxbot.config" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "chmod 600" in warnings[0].getMessage()
    assert str(path) in warnings[0].getMessage()
    assert TOKEN not in caplog.text


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize(
    ("text", "mode"),
    [
        (f'[discord]\ntoken = "{TOKEN}"\n', 0o600),
        ('[discord]\ntoken = ""\n', 0o644),
        ("[queue]\nmax_size = 3\n", 0o644),
    ],
    ids=["private-with-token", "readable-empty-token", "readable-no-token"],
)
def test_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, mode: int) -> None:
    path = write(tmp_path, text, mode=mode)
    with caplog.at_level(logging.WARNING, logger="fluxbot.config"):
        load_settings(path, env={})
    assert not [r for r in caplog.records if r.name == "fluxbot.config"]


# --------------------------------------------------------------------------
# default_settings and direct construction


def test_default_settings_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISCORD_TOKEN", "should-not-be-read-123")
    s = default_settings(queue=QueueSettings(max_size=5, max_per_user=1), model={"preset": "tiny-random", "dir": "m"})
    assert s.queue == QueueSettings(max_size=5, max_per_user=1)
    assert s.model.preset == "tiny-random"
    assert s.model.dir == tmp_path / "m"
    assert not s.discord.token
    assert default_settings(source="x.toml").source == Path("x.toml")
    with pytest.raises(ConfigError, match=r"\[queue\] max_size"):
        default_settings(queue={"max_size": 0})
    with pytest.raises(ConfigError, match=r"\[queue\] max_sise: unknown key"):
        default_settings(queue={"max_sise": 1})
    with pytest.raises(TypeError, match="unknown section 'qeue'"):
        default_settings(qeue={})


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"\[generation\] width"):
        GenerationSettings(width=1000)
    with pytest.raises(ConfigError, match=r"\[queue\] max_per_user"):
        QueueSettings(max_size=2, max_per_user=3)
    with pytest.raises(ConfigError, match=r"\[queue\] max_size"):
        dataclasses.replace(QueueSettings(), max_size=0)
    assert DiscordSettings(token="abc", guild_ids=["1", 2]) == DiscordSettings(token=Secret("abc"), guild_ids=(1, 2))  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# config.example.toml


def test_example_loads_and_matches_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(EXAMPLE, env={"DISCORD_TOKEN": TOKEN}, require_token=True)
    assert s.discord.token.get() == TOKEN
    monkeypatch.chdir(EXAMPLE.parent)
    defaults = default_settings()
    for name in SECTION_CLASSES:
        if name != "discord":
            assert getattr(s, name) == getattr(defaults, name), name
    assert (s.discord.guild_ids, s.discord.admin_user_ids) == ((), ())


def test_example_mentions_every_field() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    assert set(data) == set(SECTION_CLASSES)
    for name, cls in SECTION_CLASSES.items():
        assert f"[{name}]" in text
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(data[name]) == names, name
        for field_name in names:
            assert re.search(rf"^{field_name} = ", text, re.MULTILINE), field_name
    assert re.search(r'^token = ""$', text, re.MULTILINE)
    for phrase in ("DISCORD_TOKEN", "tiny-random", "no download", "fluxbot download", "chmod 600"):
        assert phrase in text, phrase


def test_home_servers_default_to_the_registration_servers() -> None:
    registered = default_settings(discord={"guild_ids": [5, 6]})
    assert registered.discord.home_guild_ids == (5, 6)
    both = default_settings(discord={"guild_ids": [5], "admin_guild_ids": ["7"]})
    assert both.discord.home_guild_ids == (7,)
    assert default_settings().discord.home_guild_ids == ()
    with pytest.raises(ConfigError, match=r"\[discord\] admin_guild_ids\[0\]"):
        default_settings(discord={"admin_guild_ids": ["12ab"]})
