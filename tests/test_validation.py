"""Input rules: prompt cleaning (mentions dropped, text that merely contains '@here' kept), size presets."""

from bot.validation import clean_prompt


def test_mentions_are_dropped():
    assert clean_prompt("a cat <@1002> @everyone <@&55> <@!7> @here, painted") == "a cat , painted"


def test_text_that_contains_a_mention_word_is_kept():
    assert clean_prompt("logo for shop@heresy.com") == "logo for shop@heresy.com"
    assert clean_prompt("@heretic knight, @everyones-favourite") == "@heretic knight, @everyones-favourite"


def test_portrait_and_landscape_presets_at_the_default_size():
    """config.example.toml: at 1024x1024, portrait is 832x1216 and landscape 1216x832."""
    from bot.validation import size_presets

    presets = size_presets(1024, 1024)
    assert [(presets[n].width, presets[n].height) for n in ("square", "portrait", "landscape")] == [
        (1024, 1024),
        (832, 1216),
        (1216, 832),
    ]
