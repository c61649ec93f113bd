"""Task ``lm_pretrain``: pretrain a tiny causal language model from scratch on caption / QA / instruction text.

BLIP-2 stage 2 and InstructBLIP bridge the Q-Former to a *frozen, pretrained* LLM. The shapes demo cannot
download OPT or Vicuna, so it pretrains small ones of the same architectures with this task: a
transformers ``OPTForCausalLM`` (BLIP-2 stage 2) or ``LlamaForCausalLM`` (the InstructBLIP-Vicuna path),
built with ``AutoModelForCausalLM.from_config`` at the sizes of the recipe, trained with next-token
cross-entropy on text formatted the way the vision-language stages will later feed it:

* captions (``blip_caption``-normalised) followed by ``end`` (OPT: ``"\\n"``, BLIP-2's end of caption);
* VQA lines ``"Question: {question} Short answer: {answer}"`` + ``end`` (the zero-shot VQA prompt);
* instruction/response pairs ``"{instruction} {response}"`` + ``end`` (LLaMA path: ``"</s>"``).

Options for the frozen LLM of a tiny world (not in the BLIP-2 paper, whose LLMs were pretrained elsewhere):
questions after a caption of their image (``context_copies``), only there (``context_free: false``), all of an
image's questions after one caption (``group_questions``), and the loss on answers and responses only
(``loss_on: responses``). configs/shapes/README.md has what each did to the tiny OPT's reading.

The tokenizer prepends its BOS (OPT: ``</s>``; LLaMA: ``<s>``, or ``bos_token`` to train with the BOS that
InstructBLIP-Vicuna feeds, ``</s>``). Evaluation is validation perplexity (best checkpoint by ``val_ppl``).
At the end the final model is exported to ``RUN/model`` as a standard transformers folder
(``save_pretrained`` + the tokenizer) that stage 2 loads as its frozen LLM.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from vlkit import losses
from vlkit.data.datasets import read_json
from vlkit.errors import ConfigError, DataError
from vlkit.processors import blip_caption, blip_question
from vlkit.tasks.common import resolve_path
from vlkit.training.task import TaskContext, TaskState


@dataclass
class LMArchitecture:
    """Size of the language model (mapped onto ``OPTConfig`` or ``LlamaConfig``).

    Attributes:
        hidden_size: model width.
        num_layers: decoder layers.
        num_heads: attention heads.
        num_kv_heads: key/value heads (LLaMA grouped-query attention; None = ``num_heads``).
        ffn_dim: feed-forward width (OPT ``ffn_dim``, LLaMA ``intermediate_size``).
        max_positions: longest sequence, including the visual soft prompt of the later stages.
        dropout: residual/FFN dropout (OPT ``dropout``; LLaMA has none).
        attention_dropout: attention-probability dropout.
        tie_word_embeddings: tie the output layer to the input embeddings (OPT: yes, LLaMA: no by default).
    """

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    ffn_dim: int = 1024
    max_positions: int = 256
    dropout: float = 0.1
    attention_dropout: float = 0.0
    tie_word_embeddings: bool | None = None

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "ffn_dim", "max_positions"):
            if getattr(self, key) < 1:
                raise ConfigError(f"task.architecture.{key} must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("task.architecture.hidden_size must be divisible by num_heads")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ConfigError("task.architecture.num_heads must be divisible by num_kv_heads")


@dataclass
class VqaFiles:
    """A VQAv2 questions file and its annotations file.

    Attributes:
        image_template: the image path of a question (``{image_id}``, ``{data_subtype}``), as the caption files
            name it: needed by ``context_copies`` to find the image's captions.
    """

    questions: Path
    annotations: Path
    image_template: str | None = None


@dataclass
class TextData:
    """Where the text comes from (paths relative to ``task.data_root``).

    Attributes:
        captions: LAVIS caption JSON files (train format, or eval format with caption lists).
        vqa: VQAv2 question/annotation pairs; the answer is each question's ``multiple_choice_answer``.
        instructions: instruction JSONL files ``{image, instruction, response}``.
    """

    captions: list[Path] = field(default_factory=list)
    vqa: list[VqaFiles] = field(default_factory=list)
    instructions: list[Path] = field(default_factory=list)


@dataclass
class LMPretrainConfig:
    """Options of the ``lm_pretrain`` task.

    Attributes:
        arch: ``opt`` (BLIP-2 stage 2) or ``llama`` (InstructBLIP-Vicuna path).
        architecture: model size.
        tokenizer: a transformers tokenizer folder (``vlkit data tokenizers`` writes ``opt/`` and ``llama/``).
        data_root: base of relative paths (tokenizer and data).
        train: training text; val: validation text (perplexity), or None.
        caption_template, vqa_template, instruction_template: how each kind of text is written.
        end: appended to every text (OPT: ``"\\n"``, the eos BLIP-2 generates until; LLaMA: ``"</s>"``).
        bos_token: replace the tokenizer's BOS at position 0 by this token (InstructBLIP-Vicuna feeds
            ``"</s>"``); None keeps the tokenizer's.
        max_len: tokens per text including BOS (longer texts are truncated on the right).
        val_batch_size: texts per evaluation batch.
        context_copies: each VQA and instruction text is also written this many times after one of its image's
            captions (drawn with a fixed seed): ``"{caption} Question: ... Short answer: ..."``. In BLIP-2 the
            visual prefix stands before the question; an LM that only ever saw questions at the start of a text
            does not learn to read the answer off what precedes them (shapes world: InstructBLIP VQA 35 -> 51 %).
        context_caption: which caption of the image stands before the text: ``random`` (one drawn per copy) or
            ``longest`` (the image's longest caption, first of equals, in every copy). Short captions often leave
            out what the question asks, and an LM trained on answers it cannot read off its context learns to
            guess from the question alone (shapes world, text-only VQA with the full caption before the
            question: 58.7 % random, 66.3 % longest; shape questions 10/62 -> 40/62).
        group_questions: with ``context_copies``, each copy of an image's context caption is followed by *all*
            the image's questions (in an order drawn per copy), each answer ended by ``end``:
            ``"{caption} Question: q1 Short answer: a1\\nQuestion: q2 Short answer: a2\\n"``, instead of one text
            per question. Several answers read off one context give the LM many more chances per step to learn
            which attribute belongs to which object.
        context_free: with ``context_copies``, also write each question and instruction once without a context
            (the default); False keeps only the copies after a caption, so no answer is rewarded that the LM
            could not have read off its context.
        loss_on: ``all`` tokens of every text, or ``responses``: in VQA and instruction texts only the answers
            and responses (each with its ``end``) are targets, not the context caption, question or instruction;
            caption texts keep every token. With ``all``, most of a question text's loss goes to the caption and
            question, which the LM can learn without reading anything.
    """

    arch: Literal["opt", "llama"] = "opt"
    architecture: LMArchitecture = field(default_factory=LMArchitecture)
    tokenizer: Path | None = None
    data_root: Path | None = None
    train: TextData = field(default_factory=TextData)
    val: TextData | None = None
    caption_template: str = "{caption}"
    vqa_template: str = "Question: {question} Short answer: {answer}"
    instruction_template: str = "{instruction} {response}"
    end: str = "\n"
    bos_token: str | None = None
    max_len: int = 64
    val_batch_size: int = 128
    context_copies: int = 0
    context_caption: Literal["random", "longest"] = "random"
    group_questions: bool = False
    context_free: bool = True
    loss_on: Literal["all", "responses"] = "all"

    def __post_init__(self) -> None:
        if not self.context_free and not self.context_copies:
            raise ConfigError("task.context_free: false leaves no question text without context_copies >= 1")
        if self.group_questions and not self.context_copies:
            raise ConfigError(
                "task.group_questions: the questions are grouped after a context caption; set context_copies >= 1"
            )
        if self.context_copies < 0:
            raise ConfigError(f"task.context_copies must be >= 0, got {self.context_copies}")
        if self.context_copies and not self.train.captions:
            raise ConfigError("task.context_copies: the captions that give the context come from train.captions")
        if self.context_copies and any(pair.image_template is None for pair in self.train.vqa):
            raise ConfigError("task.context_copies: every train.vqa entry needs image_template to find its captions")
        if self.tokenizer is None:
            raise ConfigError("task.tokenizer: give a tokenizer folder (e.g. from `vlkit data tokenizers`)")
        if not (self.train.captions or self.train.vqa or self.train.instructions):
            raise ConfigError("task.train: give captions, vqa or instructions files")
        if self.max_len < 2:
            raise ConfigError(f"task.max_len must be >= 2, got {self.max_len}")
        for name, keys in (
            ("caption_template", ("caption",)),
            ("vqa_template", ("question", "answer")),
            ("instruction_template", ("instruction", "response")),
        ):
            template = getattr(self, name)
            try:
                template.format(**{k: "x" for k in keys})
            except (KeyError, IndexError, ValueError) as err:
                raise ConfigError(f"task.{name}: {template!r} must use only {{{'}, {'.join(keys)}}} ({err})") from None
            if self.loss_on == "responses" and keys[-1:] != ("caption",) and template.count(f"{{{keys[-1]}}}") != 1:
                raise ConfigError(f"task.{name}: loss_on responses needs {{{keys[-1]}}} exactly once in {template!r}")


# ----------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingText:
    """One training sequence and the character spans ``[start, end)`` whose tokens are prediction targets
    (``targets`` None: every token)."""

    text: str
    targets: tuple[tuple[int, int], ...] | None = None


class _Pieces:
    """A training text built piece by piece, each piece a target or not."""

    def __init__(self) -> None:
        self.text = ""
        self.spans: list[tuple[int, int]] = []

    def add(self, piece: str, target: bool) -> _Pieces:
        if target and piece:
            self.spans.append((len(self.text), len(self.text) + len(piece)))
        self.text += piece
        return self


def _split_template(template: str, field_name: str, **values: str) -> tuple[str, str]:
    """``template`` filled with ``values`` around ``{field_name}``: the text before and after it."""
    marker = "\x00"
    before, after = template.format(**values, **{field_name: marker}).split(marker)
    return before, after


def read_texts(data: TextData, cfg: LMPretrainConfig, *, context_copies: int = 0) -> list[TrainingText]:
    """Every training sequence of ``data``, formatted with the templates and ``end`` appended; with
    ``context_copies``, VQA and instruction texts also after captions of their image, grouped per image with
    ``group_questions``; targets per ``loss_on`` (see the config)."""
    root = cfg.data_root
    responses_only = cfg.loss_on == "responses"
    out: list[TrainingText] = []
    by_image: dict[str, list[str]] = {}
    for path in data.captions:
        for index, entry in enumerate(_json_list(resolve_path(path, root))):
            caption = entry.get("caption") if isinstance(entry, dict) else None
            captions = [caption] if isinstance(caption, str) else caption
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise DataError(f"{path}: entry {index} has no caption string or list")
            out += [TrainingText(cfg.caption_template.format(caption=blip_caption(c)) + cfg.end) for c in captions]
            if isinstance(entry.get("image"), str):
                by_image.setdefault(entry["image"], []).extend(blip_caption(c) for c in captions)
    rng = random.Random(0)

    def captions_of(image: Any, where: str) -> list[str]:
        captions = by_image.get(image) if isinstance(image, str) else None
        if not captions:
            raise DataError(f"{where}: image {image!r} has no caption in train.captions (context_copies)")
        return captions

    def contexts(image: Any, where: str) -> list[str]:
        """The caption before each of the ``context_copies`` copies of a text about ``image``."""
        captions = captions_of(image, where)
        if cfg.context_caption == "longest":
            return [max(captions, key=len)] * context_copies
        return [rng.choice(captions) for _ in range(context_copies)]

    def text_of(context: str | None, turns: list[tuple[str, str]]) -> TrainingText:
        """``context`` (a caption) then each (prompt, response) turn, every response followed by ``end``."""
        pieces = _Pieces()
        if context is not None:
            pieces.add(context + " ", not responses_only)
        for prompt, response in turns:
            pieces.add(prompt, not responses_only).add(response + cfg.end, True)
        return TrainingText(pieces.text, tuple(pieces.spans) if responses_only else None)

    def without_context(turn: tuple[str, str]) -> list[TrainingText]:
        """The turn alone, unless every text stands after a caption (``context_free: false``)."""
        return [text_of(None, [turn])] if cfg.context_free or not context_copies else []

    def with_context(turn: tuple[str, str], image: Any, where: str) -> list[TrainingText]:
        copies = [text_of(c, [turn]) for c in contexts(image, where)] if context_copies else []
        return without_context(turn) + copies

    grouped: dict[str, list[tuple[str, str]]] = {}
    for pair in data.vqa:
        q_path, a_path = resolve_path(pair.questions, root), resolve_path(pair.annotations, root)
        document = read_json(q_path)
        questions = {q["question_id"]: q for q in _list_field(document, q_path, "questions")}
        subtype = document.get("data_subtype", "")
        for ann in _field_list(a_path, "annotations"):
            qid = ann.get("question_id")
            if qid not in questions or not isinstance(ann.get("multiple_choice_answer"), str):
                raise DataError(f"{a_path}: annotation of question {qid!r} has no question or answer")
            question = blip_question(questions[qid]["question"])
            before, after = _split_template(cfg.vqa_template, "answer", question=question)
            turn = (before, ann["multiple_choice_answer"] + after)
            image = None
            if pair.image_template is not None:
                image = pair.image_template.format(image_id=questions[qid].get("image_id"), data_subtype=subtype)
            if cfg.group_questions and context_copies:
                out += without_context(turn)
                grouped.setdefault(image, []).append(turn)
                captions_of(image, f"{q_path}: question {qid}")  # a caption-less image fails here, by question
            else:
                out += with_context(turn, image, f"{q_path}: question {qid}")
    for image, turns in grouped.items():
        for context in contexts(image, f"{image}: questions"):
            out.append(text_of(context, rng.sample(turns, len(turns))))
    for path in data.instructions:
        path = resolve_path(path, root)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                instruction, response = record["instruction"], record["response"]
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"{path}: line {number}: not an instruction record ({err})") from None
            prompt = blip_question(instruction)
            before, after = _split_template(cfg.instruction_template, "response", instruction=prompt)
            turn = (before, blip_caption(response) + after)
            out += with_context(turn, record.get("image"), f"{path}: line {number}")
    if not out:
        raise DataError("lm_pretrain: the text files hold no text")
    return out


def _json_list(path: Path) -> list[Any]:
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of caption entries")
    return data


def _field_list(path: Path, key: str) -> list[dict[str, Any]]:
    return _list_field(read_json(path), path, key)


def _list_field(data: Any, path: Path, key: str) -> list[dict[str, Any]]:
    """The ``key`` list of the JSON object ``data`` read from ``path`` (named in the error)."""
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: expected an object with a {key!r} list")
    return data[key]


class TextDataset(Dataset):
    """The training sequences (:class:`TrainingText`)."""

    def __init__(self, items: list[TrainingText]) -> None:
        self.items = items

    @property
    def texts(self) -> list[str]:
        """The sequences as plain strings."""
        return [item.text for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> TrainingText:
        return self.items[index]


class LMBatcher:
    """Tokenise strings into a right-padded batch: ``input_ids``, ``attention_mask`` and ``targets``.

    Targets are the ids with padding -> -100 (taken from the mask, so a pad id that is also a real token,
    such as LLaMA's eos used as filler, is never confused with padding); position 0 (BOS) is never a
    target because the loss is shifted. A :class:`TrainingText` with target spans also has -100 on every
    token that overlaps none of them (the whole string is tokenised at once, so the tokens are the same as
    without spans).
    """

    def __init__(self, tokenizer: Any, max_len: int, bos_token: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.bos_id = None
        if bos_token is not None:
            ids = tokenizer.convert_tokens_to_ids([bos_token])
            if tokenizer.bos_token_id is None or ids[0] is None or ids[0] == tokenizer.unk_token_id:
                raise ConfigError(f"task.bos_token {bos_token!r}: not a token of the tokenizer, or it adds no BOS")
            self.bos_id = ids[0]

    def __call__(self, texts: list[str | TrainingText]) -> dict[str, Tensor]:
        items = [TrainingText(t) if isinstance(t, str) else t for t in texts]
        spans = any(item.targets is not None for item in items)
        encoded = self.tokenizer(
            [item.text for item in items],
            truncation=True,
            max_length=self.max_len,
            add_special_tokens=True,
            return_offsets_mapping=spans,
        )
        rows = encoded["input_ids"]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        if self.bos_id is not None:
            if not bool((ids[:, 0] == self.tokenizer.bos_token_id).all()):
                raise DataError("task.bos_token: the tokenizer did not put its BOS at position 0")
            ids[:, 0] = self.bos_id
        targets = ids.masked_fill(mask == 0, losses.IGNORE_INDEX)
        for i, item in enumerate(items):
            if item.targets is not None:
                keep = [
                    any(start < end and lo < end and start < hi for lo, hi in item.targets)
                    for start, end in encoded["offset_mapping"][i]
                ]
                row = targets[i, : len(keep)]
                row.masked_fill_(~torch.tensor(keep, dtype=torch.bool), losses.IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "targets": targets}


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


def build_lm(cfg: LMPretrainConfig, tokenizer: Any) -> nn.Module:
    """A randomly initialised ``OPTForCausalLM`` / ``LlamaForCausalLM`` sized by ``cfg.architecture``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    a = cfg.architecture
    vocab = len(tokenizer)
    if cfg.arch == "opt":
        config = OPTConfig(
            vocab_size=vocab,
            hidden_size=a.hidden_size,
            word_embed_proj_dim=a.hidden_size,
            num_hidden_layers=a.num_layers,
            num_attention_heads=a.num_heads,
            ffn_dim=a.ffn_dim,
            max_position_embeddings=a.max_positions,
            dropout=a.dropout,
            attention_dropout=a.attention_dropout,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True if a.tie_word_embeddings is None else a.tie_word_embeddings,
        )
    else:
        if a.dropout:
            raise ConfigError("task.architecture.dropout: LLaMA has no residual dropout; set it to 0")
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=a.hidden_size,
            intermediate_size=a.ffn_dim,
            num_hidden_layers=a.num_layers,
            num_attention_heads=a.num_heads,
            num_key_value_heads=a.num_kv_heads or a.num_heads,
            max_position_embeddings=a.max_positions,
            attention_dropout=a.attention_dropout,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False if a.tie_word_embeddings is None else a.tie_word_embeddings,
        )
    return AutoModelForCausalLM.from_config(config)


def _layer_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise ConfigError(f"task.tokenizer: {path} is not a tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises many kinds
        raise ConfigError(f"task.tokenizer: cannot load {path} ({type(err).__name__}: {err})") from err


def build(cfg: LMPretrainConfig, ctx: TaskContext) -> TaskState:
    """Build the ``lm_pretrain`` task (see :mod:`vlkit.training.task` for the contract)."""
    tokenizer = load_tokenizer(resolve_path(cfg.tokenizer, cfg.data_root))
    if tokenizer.bos_token_id is None:
        raise ConfigError("task.tokenizer: the tokenizer has no BOS token")
    model = build_lm(cfg, tokenizer)
    texts = read_texts(cfg.train, cfg, context_copies=cfg.context_copies)
    batcher = LMBatcher(tokenizer, cfg.max_len, cfg.bos_token)
    info = {
        "tokenizer": f"{resolve_path(cfg.tokenizer, cfg.data_root)} ({len(tokenizer)} tokens)",
        "model": f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters",
        "training texts": f"{len(texts)}, e.g. {texts[0].text!r}",
    }

    def training_step(net: nn.Module, batch: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        return {"loss": losses.causal_lm_loss(logits, batch["targets"])}

    evaluate = None
    if cfg.val is not None:
        val_texts = read_texts(cfg.val, cfg)
        info["validation texts"] = str(len(val_texts))

        def evaluate(net: nn.Module) -> dict[str, float]:
            total, count = 0.0, 0
            for start in range(0, len(val_texts), cfg.val_batch_size):
                batch = batcher(val_texts[start : start + cfg.val_batch_size])
                batch = {k: v.to(ctx.device) for k, v in batch.items()}
                logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                n = int((batch["targets"][:, 1:] != losses.IGNORE_INDEX).sum())
                total += float(losses.causal_lm_loss(logits, batch["targets"])) * n
                count += n
            loss = total / max(count, 1)
            return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def export(net: nn.Module, state_dict: Mapping[str, Tensor], folder: Path) -> None:
        from vlkit.data.tokenizers import save_tokenizer

        net.save_pretrained(str(folder), state_dict=dict(state_dict))
        save_tokenizer(tokenizer, folder)

    return TaskState(
        model=model,
        train_dataset=TextDataset(texts),
        training_step=training_step,
        collate_fn=batcher,
        evaluate=evaluate,
        best_metric="val_ppl" if evaluate is not None else None,
        best_mode="min",
        fsdp_units=_layer_classes(model),
        deterministic_data=True,
        info=info,
        export=export,
    )
