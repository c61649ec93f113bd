"""Initialise a Q-Former from a BERT checkpoint, as BLIP-2 stage 1 does from ``bert-base-uncased``.

BLIP-2 builds its Q-Former as a BERT LM-head model and loads ``bert-base-uncased`` into it, then
(blip2-spec.md §1.6):

* embeddings (word, position, LayerNorm), every self-attention sub-layer, every text feed-forward block and
  the MLM head come from BERT;
* the cross-attention layers keep their random BERT-style initialisation (normal(0, 0.02), zero bias,
  LayerNorm 1/0);
* the vocabulary grows by ``[DEC]`` (30522 -> 30523): the new word-embedding row is random
  (normal(0, 0.02)) and the MLM decoder bias is padded with 0, as transformers' ``resize_token_embeddings``
  does;
* every query feed-forward block is then copied from its text counterpart.

The source is a transformers folder (``config.json`` + ``model.safetensors``/``pytorch_model.bin``) of a
``BertForMaskedLM``/``BertForPreTraining`` (keys under ``bert.`` and ``cls.``) or a bare ``BertModel``
(keys without prefix, no MLM head: the head then keeps its initialisation, and the report says so).

Keys dropped on purpose (every other key must be accounted for by :data:`BERT_KEYS` / :data:`HEAD_KEYS`):

* ``embeddings.token_type_embeddings.weight``: the Q-Former has no token-type embeddings (LAVIS's
  ``BertEmbeddings`` omits them, so BERT's type-0 vector is not added);
* ``embeddings.position_ids``: a buffer ``arange(512)``; positions are computed;
* ``pooler.dense.*``: LAVIS builds its BERT without the pooler;
* ``cls.predictions.decoder.weight`` / ``.decoder.bias``: aliases of the word embeddings and of
  ``cls.predictions.bias``, checked equal before being dropped;
* ``cls.seq_relationship.*``: the next-sentence head that ``bert-base-uncased`` (a ``BertForPreTraining``
  checkpoint) also ships.

Original Google checkpoints name LayerNorm parameters ``gamma``/``beta``; both spellings are accepted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from vlkit.checkpoints.keymap import KeyMap, load_exact, map_keys
from vlkit.errors import CheckpointError
from vlkit.models.qformer import QFormer


def _linear(src: str, dst: str) -> dict[str, str]:
    return {f"{src}.weight": f"{dst}.weight", f"{src}.bias": f"{dst}.bias"}


def _norm(src: str, dst: str) -> dict[str, str]:
    # transformers' LayerNorm names, and the gamma/beta names of converted TensorFlow checkpoints
    return {**_linear(src, dst), f"{src}.gamma": f"{dst}.weight", f"{src}.beta": f"{dst}.bias"}


_L = "encoder.layer.{n}"
_O = "layers.{n}"
#: BERT encoder keys (relative to ``bert.`` in LM-head checkpoints) -> QFormer keys.
BERT_KEYS: dict[str, str | None] = {
    "embeddings.word_embeddings.weight": "word_embed.weight",
    "embeddings.position_embeddings.weight": "pos_embed.weight",
    "embeddings.token_type_embeddings.weight": None,  # no token types in the Q-Former (LAVIS)
    "embeddings.position_ids": None,  # buffer arange(max_positions); positions are computed
    **_norm("embeddings.LayerNorm", "embed_norm"),
    **_linear(f"{_L}.attention.self.query", f"{_O}.self_attn.query"),
    **_linear(f"{_L}.attention.self.key", f"{_O}.self_attn.key"),
    **_linear(f"{_L}.attention.self.value", f"{_O}.self_attn.value"),
    **_linear(f"{_L}.attention.output.dense", f"{_O}.self_attn.out"),
    **_norm(f"{_L}.attention.output.LayerNorm", f"{_O}.self_attn.norm"),
    **_linear(f"{_L}.intermediate.dense", f"{_O}.text_ffn.fc1"),
    **_linear(f"{_L}.output.dense", f"{_O}.text_ffn.fc2"),
    **_norm(f"{_L}.output.LayerNorm", f"{_O}.text_ffn.norm"),
    **{k: None for k in _linear("pooler.dense", "_")},  # LAVIS's BERT has no pooler
}
#: MLM / pre-training head keys -> QFormer keys.
HEAD_KEYS: dict[str, str | None] = {
    "cls.predictions.bias": "lm_head.bias",
    **_linear("cls.predictions.transform.dense", "lm_head.dense"),
    **_norm("cls.predictions.transform.LayerNorm", "lm_head.norm"),
    "cls.predictions.decoder.weight": None,  # tied to the word embeddings (checked)
    "cls.predictions.decoder.bias": None,  # the same tensor as cls.predictions.bias (checked)
    **{k: None for k in _linear("cls.seq_relationship", "_")},  # next-sentence head of BertForPreTraining
}
_ALIASES = (
    ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
    ("cls.predictions.decoder.bias", "cls.predictions.bias"),
)
_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass
class BertInitReport:
    """What :func:`init_qformer_from_bert` did.

    Attributes:
        source: the checkpoint.
        loaded: QFormer keys copied from BERT.
        random: QFormer keys left at their random initialisation (cross-attention; the MLM head when the
            source has none).
        copied: query-FFN keys copied from the text FFNs.
        new_vocab_rows: word-embedding rows added beyond BERT's vocabulary (``[DEC]``).
        has_head: whether the source had an MLM head.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    random: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    new_vocab_rows: int = 0
    has_head: bool = True

    def summary(self) -> str:
        head = "" if self.has_head else "; no MLM head in the source (the head stays random)"
        return (
            f"{len(self.loaded)} tensors from {self.source}, {len(self.copied)} query-FFN tensors copied from the "
            f"text FFNs, {len(self.random)} random (cross-attention), {self.new_vocab_rows} new vocabulary row(s){head}"
        )


def bert_key_map(state_dict: Mapping[str, Tensor]) -> tuple[KeyMap, bool]:
    """The literal key map for ``state_dict`` and whether it is an LM-head checkpoint (``bert.``/``cls.`` keys)."""
    prefixed = any(k.startswith("bert.") for k in state_dict)
    if not prefixed:
        return dict(BERT_KEYS), False
    return {**{f"bert.{k}": v for k, v in BERT_KEYS.items()}, **HEAD_KEYS}, True


def read_bert_folder(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """Weights and ``config.json`` of a transformers BERT folder (``torch.load`` with ``weights_only=True``)."""
    from vlkit.checkpoints.hf import read_hf_weights

    path = Path(path)
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: not a transformers BERT folder (no config.json)") from err
    except ValueError as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from err
    if config.get("model_type") not in (None, "bert"):
        raise CheckpointError(f"{config_file}: model_type is {config.get('model_type')!r}, expected 'bert'")
    return read_hf_weights(path), config


def check_bert_config(config: Mapping, qformer: QFormer, *, source: str) -> None:
    """Settings that shapes cannot reveal must agree: heads, activation, LayerNorm eps, position type."""
    q = qformer.config
    problems = []
    if "num_attention_heads" in config and config["num_attention_heads"] != q.num_heads:
        problems.append(f"num_attention_heads {config['num_attention_heads']} vs Q-Former num_heads {q.num_heads}")
    act = config.get("hidden_act", "gelu")
    if _ACTS.get(act) != q.act:
        problems.append(f"hidden_act {act!r} vs Q-Former act {q.act!r}")
    eps = config.get("layer_norm_eps", 1e-12)
    if abs(float(eps) - q.ln_eps) > 1e-15:
        problems.append(f"layer_norm_eps {eps} vs Q-Former ln_eps {q.ln_eps}")
    if config.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {config['position_embedding_type']!r} (only 'absolute' is supported)")
    if problems:
        raise CheckpointError(f"{source}: BERT config does not fit the Q-Former: " + "; ".join(problems))


def _check_aliases(state_dict: Mapping[str, Tensor], *, source: str) -> None:
    for alias, original in _ALIASES:
        if alias in state_dict:
            if original not in state_dict:
                raise CheckpointError(f"{source}: {alias} is present but {original}, which it aliases, is not")
            if not torch.equal(state_dict[alias], state_dict[original]):
                raise CheckpointError(f"{source}: {alias} differs from {original}; BERT ties them")


@torch.no_grad()
def init_qformer_from_bert(
    qformer: QFormer,
    source: str | os.PathLike | Mapping[str, Tensor],
    *,
    config: Mapping | None = None,
    generator: torch.Generator | None = None,
) -> BertInitReport:
    """Load BERT weights into ``qformer`` (in place) the way BLIP-2 stage 1 starts.

    Args:
        qformer: a Q-Former with text input (``text_input=True``); its cross-attention keeps its current
            (random) values. Call on a freshly initialised Q-Former.
        source: a transformers BERT folder, or a BERT state dict (then ``config`` may give its config.json).
        config: the BERT config when ``source`` is a state dict (checked against the Q-Former if given).
        generator: RNG for the new vocabulary rows (default: the global torch RNG).

    Returns:
        A :class:`BertInitReport`.

    Raises:
        CheckpointError: a key no rule accounts for, a Q-Former key BERT should provide but does not, shape
            or config mismatches, a BERT vocabulary larger than the Q-Former's, or inconsistent tied weights.
    """
    if qformer.word_embed is None:
        raise CheckpointError("init_qformer_from_bert: the Q-Former has no text input (text_input=False)")
    if isinstance(source, Mapping):
        state_dict, name = dict(source), "BERT state dict"
    else:
        state_dict, config = read_bert_folder(source)
        name = str(source)
    if config is not None:
        check_bert_config(config, qformer, source=name)
    key_map, has_head = bert_key_map(state_dict)
    _check_aliases(state_dict, source=name)
    ours = map_keys(state_dict, key_map, source=name)
    if qformer.lm_head is None:  # a variant without the MLM head (InstructBLIP): BERT's head is not used
        ours = {k: v for k, v in ours.items() if not k.startswith("lm_head.")}

    own = qformer.state_dict()
    new_rows = 0
    if "word_embed.weight" in ours:
        words = ours["word_embed.weight"]
        target = own["word_embed.weight"]
        if words.shape[0] > target.shape[0] or words.shape[1:] != target.shape[1:]:
            raise CheckpointError(
                f"{name}: word embeddings {tuple(words.shape)} do not fit the Q-Former's {tuple(target.shape)} "
                "(its vocabulary must be BERT's plus added tokens such as [DEC])"
            )
        new_rows = target.shape[0] - words.shape[0]
        if new_rows:
            extra = torch.empty(new_rows, words.shape[1], dtype=torch.float32)
            extra.normal_(0.0, 0.02, generator=generator)  # transformers' _init_weights for new rows
            ours["word_embed.weight"] = torch.cat([words, extra.to(words.dtype)])
            if "lm_head.bias" in ours:  # resize_token_embeddings pads the decoder bias with zeros
                ours["lm_head.bias"] = torch.nn.functional.pad(ours["lm_head.bias"], (0, new_rows))

    def left_random(key: str) -> bool:
        layer_part = key.split(".", 2)[2] if key.startswith("layers.") else ""
        if layer_part.startswith(("cross_attn.", "query_ffn.")):
            return True
        return not has_head and key.startswith("lm_head.")

    load_exact(qformer, ours, source=name, allow_missing=left_random)
    qformer.init_query_ffn_from_text()
    report = BertInitReport(name, loaded=sorted(ours), new_vocab_rows=new_rows, has_head=has_head)
    for key in own:
        if key in ours:
            continue
        if ".query_ffn." in key:
            report.copied.append(key)
        else:
            report.random.append(key)
    return report
