"""Caption cleaning exactly as BLIP's pre_caption, byte decoding, flip-aware text."""

from blip.data.text import decode_caption, pre_caption, swap_left_right


def test_pre_caption_matches_blip():
    assert pre_caption("A Man (riding) a horse!!  On the beach.", 50) == "a man riding a horse on the beach"
    assert pre_caption("  #hashtag: ~tilde; *star* \"quote\"  ", 50) == "hashtag tilde star quote"
    # kept by BLIP: commas, apostrophes, hyphens, question marks
    assert pre_caption("it's a well-known dog, isn't it?", 50) == "it's a well-known dog, isn't it?"
    assert pre_caption("one two three four five", 3) == "one two three"
    assert pre_caption("...", 30) == ""
    # BLIP quirk kept: a single newline inside the text is not whitespace-collapsed
    assert pre_caption("a\nb", 30) == "a\nb"


def test_decode_caption_falls_back_to_cp1252():
    assert decode_caption("naïve".encode()) == ("naïve", True)
    assert decode_caption(b"na\xefve \x93quoted\x94") == ("naïve \u201cquoted\u201d", False)


def test_swap_left_right_whole_words_only():
    assert swap_left_right("a star on the left, left of a ring right there") == "a star on the right, right of a ring left there"
    assert swap_left_right("leftover rights") == "leftover rights"
