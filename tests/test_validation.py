"""Prompt cleaning: mentions are dropped, ordinary text that merely contains '@here' is not."""

from bot.validation import clean_prompt


def test_mentions_are_dropped():
    assert clean_prompt("a cat <@1002> @everyone <@&55> <@!7> @here, painted") == "a cat , painted"


def test_text_that_contains_a_mention_word_is_kept():
    assert clean_prompt("logo for shop@heresy.com") == "logo for shop@heresy.com"
    assert clean_prompt("@heretic knight, @everyones-favourite") == "@heretic knight, @everyones-favourite"
