"""CLIP's byte-level BPE tokenizer, built on the `tokenizers` library.

The vocabulary ships with edgesd (`data/bpe_simple_vocab_16e6.txt.gz`, MIT, see
`data/LICENSE`); model folders carry their own `tokenizer/vocab.json` and
`merges.txt`, which take precedence. Output matches transformers' CLIPTokenizer.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .errors import EdgesdError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
DEFAULT_MAX_LENGTH = 77
# Number of merges CLIP uses from the merge list (its vocabulary is 49,408 tokens).
CLIP_NUM_MERGES = 49152 - 256 - 2
# CLIP's word split: special tokens, English contractions, letter runs, single digits, other symbol runs.
WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _byte_alphabet() -> list[str]:
    """The 256 one-character symbols of byte-level BPE, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first; the other bytes
    map, in byte order, to code points from 256 upwards and come after them.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def vocab_from_bpe_merges(merge_lines: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build CLIP's vocabulary and merge list from the lines of bpe_simple_vocab_16e6.txt.

    Token ids: the 256 byte symbols, the same with the end-of-word mark `</w>`,
    one token per merge, then the two special tokens.
    """
    merges = [tuple(line.split()) for line in merge_lines[1 : CLIP_NUM_MERGES + 1]]
    alphabet = _byte_alphabet()
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def packaged_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = resources.files("edgesd") / "data" / "bpe_simple_vocab_16e6.txt.gz"
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return vocab_from_bpe_merges(f.read().split("\n"))


class ClipTokenizer:
    """Prompt text -> fixed-length token ids, as SD's text encoder expects."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        max_length: int = DEFAULT_MAX_LENGTH,
        pad_token: str = EOS,
    ):
        for special in (BOS, EOS, pad_token):
            if special not in vocab:
                raise EdgesdError(f"tokenizer vocabulary lacks the token {special!r}", "use a CLIP vocab.json")
        bad = next((k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0), None)
        if bad is not None:
            raise EdgesdError(f"tokenizer vocabulary gives {bad!r} the id {vocab[bad]!r}, not a whole number >= 0",
                              "use a CLIP vocab.json (re-export the model)")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 3:
            raise EdgesdError(f"tokenizer model_max_length {max_length!r} leaves no room for a prompt (needs >= 3)",
                              "fix tokenizer_config.json (CLIP: 77)")
        model = BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=EOS, fuse_unk=False)
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        # The pad token is special too: where it is "!" (SD 2.x, SDXL's second tokenizer) transformers' CLIPTokenizer
        # splits every "!" out as that token ("dogs!!" -> dogs</w> ! !), and so do we.
        tok.add_special_tokens(list(dict.fromkeys([BOS, EOS, pad_token])))
        self._tok = tok
        self.bos_id = vocab[BOS]
        self.eos_id = vocab[EOS]
        self.pad_id = vocab[pad_token]
        self.max_length = max_length

    @classmethod
    def packaged(cls) -> "ClipTokenizer":
        vocab, merges = packaged_vocab()
        return cls(vocab, merges)

    @classmethod
    def from_folder(cls, folder: Path) -> "ClipTokenizer":
        """Read a transformers-style tokenizer folder (vocab.json + merges.txt [+ tokenizer_config.json])."""
        folder = Path(folder)
        vocab, merges = _read_vocab_and_merges(folder)
        max_length, pad = DEFAULT_MAX_LENGTH, EOS
        config = folder / "tokenizer_config.json"
        if config.is_file():
            cfg = json.loads(config.read_text(encoding="utf-8"))
            try:
                max_length = int(cfg.get("model_max_length", max_length))
            except (TypeError, ValueError):
                raise EdgesdError(f"{config}: model_max_length {cfg.get('model_max_length')!r} is not a number",
                                  "fix tokenizer_config.json (CLIP: 77)") from None
            if max_length > 10_000:  # transformers' "unset" sentinel
                max_length = DEFAULT_MAX_LENGTH
            pad = _token_text(cfg.get("pad_token")) or pad
        return cls(vocab, merges, max_length=max_length, pad_token=pad)

    def write_folder(self, folder: Path) -> None:
        """Write vocab.json, merges.txt and configs in the layout transformers and optimum use."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model = json.loads(self._tok.to_str())["model"]
        (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        id_to_token = {v: k for k, v in model["vocab"].items()}
        specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": id_to_token[self.pad_id]}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, **specials}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")

    def token_count(self, text: str) -> int:
        """Tokens in `text` without BOS/EOS; above max_length - 2 the prompt gets truncated."""
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` with BOS/EOS, truncated to max_length, not padded."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids[: self.max_length - 2], self.eos_id]

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """Token ids padded to max_length: (len(prompts), max_length) int64."""
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        for row, text in zip(out, prompts):
            ids = self.tokenize(text)
            row[: len(ids)] = ids
        return out


def _token_text(value) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_vocab_and_merges(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json + merges.txt (transformers 4.x, optimum), else the BPE model inside tokenizer.json (5.x)."""
    vocab_file, merges_file, joint = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
    try:
        if vocab_file.is_file() and merges_file.is_file():
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
            lines = merges_file.read_text(encoding="utf-8").split("\n")
            return vocab, [tuple(l.split()) for l in lines if l and not l.startswith("#version")]
        if joint.is_file():
            model = json.loads(joint.read_text(encoding="utf-8"))["model"]
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            return model["vocab"], merges
    except (OSError, ValueError, KeyError) as e:
        raise EdgesdError(f"cannot read the tokenizer in {folder}: {e}", "re-export the model") from None
    raise EdgesdError(
        f"{folder} has no vocab.json and merges.txt (nor tokenizer.json)",
        "copy the CLIP tokenizer files into it (edgesd export writes them)",
    )
