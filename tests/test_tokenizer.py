import pytest

from edgesd.tokenizer import ClipTokenizer

TRICKY = [
    "a photo of a cat",
    "Café déjà vu — naïve résumé!!",
    "  many    spaces\t\tand\nnewlines  ",
    "日本語のテキスト 中文 한국어",
    "12345 3.14159 1,000,000 2nd 3rd",
    "it's we're I'll they'd you've I'm",
    "emoji 🐱🚀👍🏽 and symbols ©®™ ±≠",
    "(masterpiece:1.2), [best quality], {detailed}, <lora:x:0.5>",
    "ÀÉÎÕÜ straße ﬁnance Ωmega",
    "hello,world;foo:bar!?...---",
    "UPPER lower MiXeD",
    "",
    "word " * 100,  # over 77 tokens: truncated, EOS kept last
    "a <|endoftext|> b <|startoftext|>",
    "\u200bzero\u00a0width and nbsp",
]


def test_packaged_vocabulary_matches_clip():
    tok = ClipTokenizer.packaged()
    assert tok.tokenize("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tok(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids.dtype.name == "int64"
    assert (ids[0, 7:] == 49407).all()  # SD 1.x pads with <|endoftext|>


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])  # SD 1.x; SD 2.x and SDXL's second tokenizer
@pytest.mark.parametrize("prompt", TRICKY + ["dogs!! and cats!", "wow! ! !!!", "!start and end!"])
def test_matches_transformers_clip_tokenizer(prompt, pad, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from edgesd.tokenizer import packaged_vocab

    folder = tmp_path_factory.getbasetemp() / f"clip-tokenizer-{pad != '!'}"
    if not folder.exists():
        ClipTokenizer(*packaged_vocab(), pad_token=pad).write_folder(folder)
    ours = ClipTokenizer.from_folder(folder)
    theirs = transformers.CLIPTokenizer.from_pretrained(folder)
    expected = theirs([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="np")
    assert ours([prompt]).tolist() == expected["input_ids"].tolist()


def test_missing_tokenizer_files_is_a_clear_error(tmp_path):
    from edgesd.errors import EdgesdError

    with pytest.raises(EdgesdError, match="vocab.json and merges.txt"):
        ClipTokenizer.from_folder(tmp_path)


def test_reads_tokenizer_json_only_folders(tmp_path):
    """transformers 5.x saves a CLIP tokenizer as tokenizer.json alone."""
    transformers = pytest.importorskip("transformers")
    source = tmp_path / "four"
    ClipTokenizer.packaged().write_folder(source)
    transformers.CLIPTokenizer.from_pretrained(source).save_pretrained(tmp_path / "five")
    five = tmp_path / "five"
    for name in ("vocab.json", "merges.txt"):
        (five / name).unlink(missing_ok=True)
    assert (five / "tokenizer.json").is_file()
    assert ClipTokenizer.from_folder(five).tokenize("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_exclamation_pad_token_is_split_out_as_transformers_does(tmp_path):
    """Where "!" pads (SD 2.x), every "!" is that special token: "dogs!!" -> dogs</w> ! !, not the merged !!."""
    from edgesd.tokenizer import packaged_vocab

    ClipTokenizer(*packaged_vocab(), pad_token="!").write_folder(tmp_path)
    tok = ClipTokenizer.from_folder(tmp_path)
    assert tok.tokenize("dogs!!")[1:-1] == [tok.tokenize("dogs")[1], 0, 0]
    assert ClipTokenizer.packaged().tokenize("dogs!!")[2] == 748  # "!!</w>" where "!" is not the pad token
