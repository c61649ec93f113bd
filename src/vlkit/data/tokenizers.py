"""Small tokenizers for the shapes world, trained with the ``tokenizers`` library.

The real models use bert-base-uncased (Q-Former), GPT-2 BPE (OPT) and LLaMA SentencePiece (Vicuna)
vocabularies of 30-50k entries. The shapes world has a vocabulary of a few dozen words, so the demo models
get tokenizers of the same *kinds*, trained on shapes text, that keep every convention the model code
relies on:

- ``qformer``: BERT WordPiece, lower-cased; ``[PAD]``=0, ``[UNK]``=1, ``[CLS]``=2, ``[SEP]``=3, ``[MASK]``=4;
  the words of the corpus plus a character fallback; encodes ``[CLS] text [SEP]``.
  :class:`vlkit.processors.QFormerTokenizer` appends ``[DEC]`` as the next id.
- ``opt``: byte-level BPE with OPT's special-token layout: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3;
  bos = eos = unk = ``</s>``, pad = ``<pad>``; every encoding starts with ``</s>`` (OPT's BOS, id 2), and
  ``"\\n"`` is one token (BLIP-2's end-of-caption / eos convention).
- ``llama``: LLaMA-style BPE over ``▁``-marked words with byte fallback: ``<unk>``=0, ``<s>``=1, ``</s>``=2,
  the 256 byte tokens ``<0x00>``..``<0xFF>`` next (as in LLaMA's vocabulary), then the learned pieces;
  every encoding starts with ``<s>``. InstructBLIP-Vicuna's overrides (bos = eos = unk = ``</s>``, an added
  ``[PAD]``) are applied later by the processors, not here.

Each is saved as a standard transformers tokenizer folder (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``; plus ``vocab.txt`` for WordPiece) that ``AutoTokenizer.from_pretrained(folder)``
loads offline as ``BertTokenizer`` / ``GPT2Tokenizer`` / ``LlamaTokenizer``.

``vlkit data tokenizers SHAPES_DIR OUT`` writes all three (``OUT/qformer``, ``OUT/opt``, ``OUT/llama``).
"""

from __future__ import annotations

import json
import os
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from vlkit.data.datasets import read_json
from vlkit.data.shapes import SPLITS, shapes_paths
from vlkit.errors import DataError
from vlkit.processors import blip_caption, blip_question

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))

# Prompt templates the models are later driven with; their words belong in the LM vocabularies.
VQA_TEMPLATE = "Question: {question} Short answer: {answer}"
CAPTION_END = "\n"  # OPT: appended to every caption, the eos of BLIP-2 generation


# ----------------------------------------------------------------------------------------------------------
# Shapes text
# ----------------------------------------------------------------------------------------------------------


def shapes_texts(root: str | os.PathLike, splits: Sequence[str] = ("train",)) -> dict[str, list[str]]:
    """Every piece of text of a shapes world, by kind (raw, as written in the files).

    Args:
        root: the shapes world folder.
        splits: which splits to read.

    Returns:
        ``{"captions", "questions", "answers", "instructions", "responses", "classes"}`` -> strings.

    Raises:
        DataError: if ``root`` is not a shapes world or a file is malformed.
    """
    out: dict[str, list[str]] = {k: [] for k in ("captions", "questions", "answers", "instructions", "responses")}
    if not splits:
        raise DataError("shapes_texts: give at least one split")
    for split in splits:
        paths = shapes_paths(root, split)
        for entry in read_json(paths.coco_captions):
            caption = entry.get("caption") if isinstance(entry, dict) else None
            out["captions"] += [caption] if isinstance(caption, str) else list(caption or [])
        questions = read_json(paths.vqa_questions).get("questions", [])
        out["questions"] += [q["question"] for q in questions]
        annotations = read_json(paths.vqa_annotations).get("annotations", [])
        out["answers"] += [a["answer"] for ann in annotations for a in ann["answers"]]
        for line in paths.instructions.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                out["instructions"].append(record["instruction"])
                out["responses"].append(record["response"])
    labels = shapes_paths(root, splits[0]).labels
    out["classes"] = [line for line in labels.read_text(encoding="utf-8").splitlines() if line]
    return out


def qformer_corpus(texts: dict[str, list[str]]) -> list[str]:
    """Text as the Q-Former sees it: processed captions and questions, answers, instructions, classes."""
    return (
        [blip_caption(t) for t in texts["captions"]]
        + [blip_question(t) for t in texts["questions"] + texts["instructions"]]
        + texts["answers"]
        + texts["responses"]
        + texts["classes"]
    )


def lm_corpus(texts: dict[str, list[str]], *, caption_end: str = CAPTION_END) -> list[str]:
    """Text as the LLMs see it: processed captions (+ ``caption_end``), VQA prompts with answers, instructions."""
    questions, answers = texts["questions"], texts["answers"]
    qa = [VQA_TEMPLATE.format(question=blip_question(q), answer=a) for q, a in zip(questions, answers)]
    return (
        [blip_caption(t) + caption_end for t in texts["captions"]]
        + qa
        + [f"{blip_question(i)} {r}" for i, r in zip(texts["instructions"], texts["responses"])]
        + texts["captions"]  # raw (cased, punctuated) forms too
        + texts["classes"]
    )


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _ordered_vocab(vocab: dict[str, int], first: Sequence[str]) -> dict[str, int]:
    """``first`` at ids 0.. in order, then the remaining tokens in their trained id order."""
    missing = [t for t in first if t not in vocab]
    if missing:
        raise DataError(f"trained vocabulary lacks {missing}")
    rest = sorted((t for t in vocab if t not in set(first)), key=vocab.__getitem__)
    return {token: i for i, token in enumerate([*first, *rest])}


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> Path:
    """``tokenizer.save_pretrained(folder)`` plus ``special_tokens_map.json``.

    transformers 5 no longer writes ``special_tokens_map.json``; older versions and other tools read it.
    """
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    tokens = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    (folder / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n", encoding="utf-8")
    return folder


def train_wordpiece(
    corpus: Iterable[str], out: str | os.PathLike, *, vocab_size: int = 1000, min_frequency: int = 1
) -> Path:
    """Build a lower-casing BERT WordPiece tokenizer from a corpus and save it as a ``BertTokenizer`` folder.

    The vocabulary is the special tokens, every printable ASCII character both word-initial and word-inner
    (``x`` and ``##x``, so no word is ever ``[UNK]``), then the corpus's words (after BERT's normalisation
    and pre-tokenisation, done by the ``tokenizers`` library) by decreasing frequency, ties alphabetical,
    up to ``vocab_size``. WordPiece's greedy longest match then reads every known word as one token and
    spells unknown ones out. (``tokenizers``' WordPieceTrainer would add intermediate pieces, but breaks
    ties in hash order: a different vocabulary on every run. A closed world like the shapes world needs
    no pieces, and this vocabulary is reproducible.)

    Args:
        corpus: training text.
        out: output folder.
        vocab_size: upper bound on the vocabulary (specials and alphabet included).
        min_frequency: words seen fewer times are left out.

    Returns:
        The folder (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``, ``vocab.txt``).
    """
    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizer

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in corpus:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet = sorted(set(string.printable.lower()) - set(string.whitespace))
    base = [*BERT_SPECIALS, *alphabet, *("##" + c for c in alphabet)]
    if vocab_size < len(base):
        raise DataError(f"WordPiece vocab_size {vocab_size} is smaller than specials + alphabet ({len(base)})")
    known = set(base)
    words = sorted(
        (w for w, n in counts.items() if n >= min_frequency and w not in known), key=lambda w: (-counts[w], w)
    )
    vocab = {token: i for i, token in enumerate([*base, *words[: vocab_size - len(base)]])}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512), folder)
    by_id = sorted(vocab, key=vocab.__getitem__)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in by_id), encoding="utf-8")
    return folder


def train_opt_bpe(corpus: Iterable[str], out: str | os.PathLike, *, vocab_size: int = 1000) -> Path:
    """Train a byte-level BPE with OPT's special tokens and save it as a ``GPT2Tokenizer`` folder.

    Every byte is in the base alphabet, so nothing is ever unknown, and ``"\\n"`` (``Ċ``) is one token: the
    byte-level pre-tokenizer keeps whitespace runs apart from words, so no merge can absorb it.

    Returns:
        The folder (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(OPT_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    vocab = _ordered_vocab(tok.get_vocab(), OPT_SPECIALS)
    merges = _merges_of(tok)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    hf = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
        add_prefix_space=False,
        add_bos_token=True,  # OPT prepends </s> (id 2) to every sequence
    )
    return save_tokenizer(hf, folder)


def train_llama_bpe(corpus: Iterable[str], out: str | os.PathLike, *, vocab_size: int = 1000) -> Path:
    """Train a LLaMA-style BPE (``▁`` word marks, byte fallback) and save it as a ``LlamaTokenizer`` folder.

    Pieces are learned within words (as SentencePiece does by default), so no piece spans a ``▁`` boundary;
    characters never seen in training fall back to their UTF-8 byte tokens (``"\\n"`` -> ``<0x0A>``), as in
    LLaMA's own vocabulary.

    Returns:
        The folder (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    reserved = len(LLAMA_SPECIALS) + len(BYTE_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - len(BYTE_TOKENS), len(LLAMA_SPECIALS) + 1),
        special_tokens=list(LLAMA_SPECIALS),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    trained = tok.get_vocab()
    learned = sorted((t for t in trained if t not in LLAMA_SPECIALS and t not in BYTE_TOKENS), key=trained.__getitem__)
    vocab = {token: i for i, token in enumerate([*LLAMA_SPECIALS, *BYTE_TOKENS, *learned])}
    assert len(vocab) == reserved + len(learned)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    hf = LlamaTokenizer(vocab=vocab, merges=_merges_of(tok), add_bos_token=True, add_eos_token=False)
    return save_tokenizer(hf, folder)


def _merges_of(tok) -> list[tuple[str, str]]:
    model = json.loads(tok.to_str())["model"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def build_shapes_tokenizers(
    shapes_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    splits: Sequence[str] = ("train",),
    qformer_vocab: int = 1000,
    lm_vocab: int = 1000,
) -> dict[str, Path]:
    """Train the three shapes tokenizers from a shapes world and save them under ``out``.

    Args:
        shapes_root: the shapes world (``vlkit data shapes``).
        out: output folder; gets ``qformer/``, ``opt/`` and ``llama/``.
        splits: splits whose text is used (default: train only, so nothing is learned from held-out text).
        qformer_vocab, lm_vocab: vocabulary size bounds.

    Returns:
        ``{"qformer": folder, "opt": folder, "llama": folder}``.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DataError(f"unknown split(s) {unknown}; choose from {', '.join(SPLITS)}")
    texts = shapes_texts(shapes_root, splits)
    out = Path(out)
    lm_text = lm_corpus(texts)
    return {
        "qformer": train_wordpiece(qformer_corpus(texts), out / "qformer", vocab_size=qformer_vocab),
        "opt": train_opt_bpe(lm_text, out / "opt", vocab_size=lm_vocab),
        # LLaMA-path text ends with the eos token, not a newline (InstructBLIP-Vicuna appends "</s>")
        "llama": train_llama_bpe(lm_corpus(texts, caption_end=""), out / "llama", vocab_size=lm_vocab),
    }
