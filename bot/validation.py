"""Checks on what a member typed. Discord enforces option types and ranges in its client, but a
raw request can carry anything, so every value is checked again here. Each refusal names the
option and says what is wrong; nothing here touches the queue or the database. A member's own
defaults (/settings, `MemberSettings`) fill in what /imagine was not told."""

from __future__ import annotations

import re
import secrets
import unicodedata
from dataclasses import dataclass

from .config import GenerationSettings, ModerationSettings
from .params import MAX_COUNT, JobParams, MemberSettings

MAX_SEED = 2**32 - 1

# Letters and symbols that render as blank space (Hangul fillers, the braille blank): a prompt of
# them alone would be painted as if it said something.
_BLANK_LOOKALIKES = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800"}
_MENTION = re.compile(r"<@[!&]?\d+>|(?<![\w@])@(?:everyone|here)\b")  # not inside words (shop@heresy.com)


class ValidationError(ValueError):
    """A value a member gave is unusable; the message is safe to show them."""


@dataclass(frozen=True)
class SizePreset:
    name: str
    label: str
    width: int
    height: int


def size_presets(width: int, height: int) -> dict[str, SizePreset]:
    """Square is the configured size; portrait and landscape keep about the same pixel count."""
    long_side = max(16, round(max(width, height) * 1.1875 / 16) * 16)
    short_side = max(16, round(min(width, height) * 0.8125 / 16) * 16)
    presets = [
        SizePreset("square", f"Square {width}x{height}", width, height),
        SizePreset("portrait", f"Portrait {short_side}x{long_side}", short_side, long_side),
        SizePreset("landscape", f"Landscape {long_side}x{short_side}", long_side, short_side),
    ]
    return {p.name: p for p in presets}


def fold(text: str) -> str:
    """Lower-case, accent-free form used to match blocked terms."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def clean_prompt(prompt: object) -> str:
    if not isinstance(prompt, str):
        raise ValidationError("prompt must be text")
    # Format characters (zero-width, bidi controls, soft hyphen, tags...) are invisible, and a way
    # to smuggle blocked terms past a filter: drop them.
    text = "".join(c for c in prompt if unicodedata.category(c) != "Cf")
    text = "".join(" " if c in _BLANK_LOOKALIKES else c for c in text)
    # Mentions mean nothing to the painter (and must never ping): drop them.
    text = _MENTION.sub(" ", text)
    # Other control characters (newlines and tabs included) become spaces.
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return " ".join(text.split())


def check_prompt(prompt: object, *, max_chars: int, blocked_terms: tuple[str, ...] = ()) -> str:
    text = clean_prompt(prompt)
    if not any(unicodedata.category(c)[0] not in "MZ" for c in text):  # nothing but marks and spaces
        raise ValidationError("prompt is empty: describe the image you want")
    if len(text) > max_chars:
        raise ValidationError(f"prompt is too long: {len(text)} characters, the limit is {max_chars}")
    folded = fold(text)
    for term in blocked_terms:
        if term.strip() and fold(term.strip()) in folded:
            raise ValidationError("prompt contains a term this server does not allow")
    return text


def _whole_number(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{name} must be a whole number")
    return value


def check_seed(seed: object) -> tuple[int, bool]:
    """Returns (seed, was_random). None or -1 draws a random seed."""
    value = _whole_number(seed, "seed")
    if value is None or value == -1:
        return secrets.randbelow(MAX_SEED + 1), True
    if not 0 <= value <= MAX_SEED:
        raise ValidationError(f"seed must be between 0 and {MAX_SEED} (or -1 for a random seed)")
    return value, False


def check_steps(steps: object, *, default: int, maximum: int) -> int:
    value = _whole_number(steps, "steps")
    if value is None:
        return default
    if not 1 <= value <= maximum:
        raise ValidationError(f"steps must be between 1 and {maximum}")
    return value


def check_size(size: object, presets: dict[str, SizePreset]) -> str | None:
    """A size preset's name (None stays None: not given)."""
    if size is not None and (not isinstance(size, str) or size not in presets):
        raise ValidationError(f"size must be one of: {', '.join(presets)}")
    return size


def check_count(count: object) -> int | None:
    value = _whole_number(count, "count")
    if value is not None and not 1 <= value <= MAX_COUNT:
        raise ValidationError(f"count must be between 1 and {MAX_COUNT}")
    return value


def _true_or_false(value: object, name: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValidationError(f"{name} must be true or false")
    return value


def check_member_settings(
    size: object, steps: object, count: object, previews: object, generation: GenerationSettings
) -> MemberSettings:
    """The /settings options a member gave (None: not given, left as stored)."""
    return MemberSettings(
        size=check_size(size, size_presets(generation.width, generation.height)),
        steps=None
        if steps is None
        else check_steps(steps, default=generation.default_steps, maximum=generation.max_steps),
        count=check_count(count),
        previews=_true_or_false(previews, "previews"),
    )


def check_reset(reset: object) -> bool:
    return bool(_true_or_false(reset, "reset"))


def member_defaults(mine: MemberSettings, generation: GenerationSettings) -> tuple[int, str]:
    """The steps and size preset a member's /imagine uses when not told: theirs, else the bot's. Stored
    steps above today's maximum are capped to it; a size the bot no longer offers is square."""
    steps = generation.default_steps if mine.steps is None else min(mine.steps, generation.max_steps)
    presets = size_presets(generation.width, generation.height)
    size = mine.size if mine.size is not None and mine.size in presets else "square"
    return steps, size


def check_imagine(
    prompt: object,
    seed: object,
    steps: object,
    size: object,
    generation: GenerationSettings,
    moderation: ModerationSettings,
    mine: MemberSettings | None = None,
    count: object = None,
) -> JobParams:
    """Every /imagine option checked against this bot's generation and moderation settings; what is
    not given comes from the member's own defaults (`mine`), else the bot's (`count`: 1)."""
    text = check_prompt(prompt, max_chars=generation.max_prompt_chars, blocked_terms=moderation.blocked_terms)
    value, _ = check_seed(seed)
    default_steps, default_size = member_defaults(mine or MemberSettings(), generation)
    n = check_steps(steps, default=default_steps, maximum=generation.max_steps)
    presets = size_presets(generation.width, generation.height)
    preset = presets[check_size(size, presets) or default_size]
    images = check_count(count)
    if images is None:
        images = (mine or MemberSettings()).count or 1
    return JobParams(text, value, n, preset.width, preset.height, count=images)
