"""BERT WordPiece tokenisation of prompts, as latent diffusion's text encoder expects it.

LDMTextToImagePipeline tokenises with transformers' BertTokenizer (bert-base-uncased's
vocab.txt), padding="max_length", max_length=77, truncation=True. This module gives the
same ids from the same files with the `tokenizers` package alone (no transformers):

    tokenizer = PromptTokenizer.from_folder("ldm-text2im-large-256/tokenizer")
    ids = tokenizer(["a painting of a squirrel eating a burger"])   # int32 [1, 77]

Each row is [CLS] wordpieces... [SEP] [PAD]...: text cleaned (control characters
dropped, whitespace normalised), lowercased and stripped of accents (uncased vocab),
split on whitespace, punctuation and CJK characters, then greedy longest-match
WordPiece ("##" continuations; a word with no match, or over 100 characters, is [UNK]);
cut to max_length - 2 pieces, so [SEP] is always there.
"""

import dataclasses
import json
from typing import Any

import numpy as np
import tokenizers
from etils import epath

MAX_LENGTH = 77  # the pipeline's max_length, = LDMBert's max_position_embeddings


@dataclasses.dataclass(frozen=True)
class PromptTokenizer:
    """Prompts -> int32 [N, max_length] token ids (see the module docstring).

    Attributes:
      tokenizer: the `tokenizers.Tokenizer` with BERT's normaliser, pre-tokeniser,
        WordPiece model and [CLS]/[SEP] template; truncation and padding are applied in
        `__call__`.
      max_length: the length of every row.
      pad_id: id of [PAD] (0 in BERT's vocab).
    """

    tokenizer: tokenizers.Tokenizer
    max_length: int
    pad_id: int

    @classmethod
    def from_files(
        cls,
        vocab_path: epath.PathLike,
        config: dict[str, Any] | None = None,
        max_length: int = MAX_LENGTH,
    ) -> "PromptTokenizer":
        """Build from a vocab.txt (one token a line, id = line number) and a tokenizer_config.

        config: the tokenizer_config.json dict transformers writes (do_lower_case,
        strip_accents, tokenize_chinese_chars and the special tokens); missing keys take
        BertTokenizer's defaults (uncased, accents stripped with lowercasing).
        """
        config = config or {}
        if config.get("do_basic_tokenize", True) is False:
            raise ValueError(
                "tokenizer_config sets do_basic_tokenize=False, which is not supported"
            )
        return cls.from_vocab(read_vocab(vocab_path), config, max_length, source=vocab_path)

    @classmethod
    def from_vocab(
        cls,
        vocab: dict[str, int],
        config: dict[str, Any] | None = None,
        max_length: int = MAX_LENGTH,
        source="the vocabulary",
    ) -> "PromptTokenizer":
        """Build from {token: id} (see from_files for `config`)."""
        config = config or {}
        special = {
            name: _token_text(config.get(name, default))
            for name, default in [
                ("unk_token", "[UNK]"),
                ("sep_token", "[SEP]"),
                ("cls_token", "[CLS]"),
                ("pad_token", "[PAD]"),
                ("mask_token", "[MASK]"),
            ]
        }
        tokenizer = tokenizers.BertWordPieceTokenizer(
            vocab,
            clean_text=True,
            handle_chinese_chars=config.get("tokenize_chinese_chars", True),
            strip_accents=config.get("strip_accents"),  # None: follow lowercasing, as BERT
            lowercase=config.get("do_lower_case", True),
            **special,
        )
        missing = [t for t in special.values() if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"special tokens {missing} are not in {source}")
        pad_id = tokenizer.token_to_id(special["pad_token"])
        # The BertWordPieceTokenizer wrapper is only a builder; keep the core Tokenizer.
        core = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        core.enable_truncation(max_length)  # counts [CLS] and [SEP], as transformers does
        core.enable_padding(pad_id=pad_id, pad_token=special["pad_token"], length=max_length)
        return cls(core, max_length, pad_id)

    @classmethod
    def from_folder(cls, folder: epath.PathLike, max_length: int = MAX_LENGTH):
        """Build from a pipeline's tokenizer/ folder: vocab.txt and tokenizer_config.json."""
        folder = epath.Path(folder)
        vocab = folder / "vocab.txt"
        if not vocab.exists():
            found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            raise FileNotFoundError(f"no vocab.txt in {folder} (found: {found})")
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        return cls.from_files(vocab, config, max_length)

    def __call__(self, prompts: list[str] | str) -> np.ndarray:
        """[N] prompts (or one string) -> int32 [N, max_length] ids, [PAD]-filled."""
        if isinstance(prompts, str):
            prompts = [prompts]
        encodings = self.tokenizer.encode_batch(list(prompts))
        return np.asarray([e.ids for e in encodings], dtype=np.int32).reshape(-1, self.max_length)


# What the tokenizers library (Rust's str::trim_end) strips from the end of a vocab line:
# Unicode White_Space. str.rstrip() would strip the separators \x1c-\x1f as well.
_WHITE_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(
    map(chr, range(0x2000, 0x200B))  # U+2000 to U+200A
)


def read_vocab(path: epath.PathLike) -> dict[str, int]:
    """vocab.txt -> {token: id}, as `tokenizers` reads the file itself: id = line number,
    lines split at "\\n" only, trailing white space dropped, a later duplicate wins. Read
    here, through epath, so that a vocab.txt on gs:// serves too."""
    lines = epath.Path(path).read_bytes().decode("utf-8").split("\n")
    if lines[-1] == "":  # the newline that ends the last line starts no line
        lines.pop()
    return {line.rstrip(_WHITE_SPACE): index for index, line in enumerate(lines)}


def _token_text(token: str | dict) -> str:
    # transformers writes special tokens either as strings or as AddedToken dicts.
    return token["content"] if isinstance(token, dict) else token
