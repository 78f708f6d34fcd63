"""The command line (real entry point, small sizes), the tokenizer corpus and the contact sheet."""

import json

import pytest
from fixtures_data import small_world_fixture  # noqa: F401 (fixture)
from PIL import Image

from blip.data.__main__ import main
from blip.data.corpus import caption_corpus


def test_generate_inspect_and_contact_sheet_commands(tmp_path, capsys):
    root = tmp_path / "gen"
    assert main(["generate", "--out", str(root), "--web", "30", "--human", "6", "--val", "4", "--test", "4",
                 "--zeroshot", "4", "--shard-size", "10", "--noise-rate", "0.5", "--quiet", "--processes", "1"]) == 0
    out = capsys.readouterr().out
    assert "web noise rate 0.500 (15/30)" in out and "human" in out and "skipped: none" in out
    assert "wrong_attribute" in out and "gt annotations/val_gt.json" in out
    assert json.loads((root / "manifest.json").read_text())["splits"]["human"]["pairs"] == 30

    assert main(["inspect", str(root / "web"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "read 30 samples: 30 usable images, 30 usable pairs" in out and "skipped: none" in out

    png = tmp_path / "sheet.png"
    assert main(["contact-sheet", "--root", str(root), "--split", "web", "--out", str(png), "-n", "12", "--cols", "4"]) == 0
    assert "12 samples" in capsys.readouterr().out
    with Image.open(png) as im:
        assert im.width == 4 * 160 and im.height > 3 * 160
        # noisy tiles carry a red frame: some pure-ish red pixels exist
        assert any(r > 180 and g < 60 and b < 60 for r, g, b in im.convert("RGB").getdata())


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("generate", "import-coco", "import-flickr", "inspect", "contact-sheet"):
        assert cmd in out


def test_caption_corpus_yields_web_and_all_human_captions(small_world):
    web = list(caption_corpus(small_world / "web"))
    human = list(caption_corpus(small_world / "human"))
    both = list(caption_corpus([small_world / "web", small_world / "human"]))
    assert len(web) == 120 and len(human) == 24 * 5 and both == web + human
    assert all(c == c.lower() and c.strip() == c and c for c in both)
    assert len(list(caption_corpus(small_world / "human", all_captions=False))) == 24
    raw = list(caption_corpus(small_world / "web", clean=False))
    assert any(c != c.lower() for c in raw)  # web alt-text style keeps its capitals when asked
