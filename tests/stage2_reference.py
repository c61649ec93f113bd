"""Reference-side helpers for the stage-2 / InstructBLIP tests, independent of src/.

* tiny tokenizers that behave like the real ones (built with ``tokenizers``, saved in transformers format):
  OPT (byte-level BPE, ``</s>`` prepended, "\\n" a single token), T5 (``</s>`` appended, pad 0) and LLaMA
  (``<s>`` prepended, ids unk 0 / bos 1 / eos 2);
* tiny transformers ``Blip2ForConditionalGeneration`` / ``InstructBlipForConditionalGeneration`` with OPT,
  T5 (exact-GELU gated FFN, as the FlanT5 BLIP-2 folders) or LLaMA, with random weights large enough for
  varied generations;
* ``hf_inputs``: transformers 5.x's input layout (``num_query_tokens`` image-token ids before the text).
"""

from __future__ import annotations

import torch
from blip2_reference import randomize
from torch import nn

CORPUS = [
    "a photo of a cat sitting on a red sofa",
    "two dogs running on the green grass\n",
    "question: what color is the bus? short answer: yellow",
    "a man riding a bike down the street",
    "a short image caption. describe the image in detail.",
    "the sky is blue and the sea is calm\n",
    "what is the man holding? an umbrella",
] * 3

LLM_VOCAB = {"opt": 320, "t5": 128, "llama": 128}
# Large enough for varied (non-repeating) generations, small enough that T5's unscaled attention does not turn
# 1e-6 differences of the visual prefix into 1e-3 differences of the logits.
LLM_STD = {"opt": 0.5, "t5": 0.2, "llama": 0.5}


def _bpe(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if kind == "opt":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=310, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    else:
        specials = ["<pad>", "</s>", "<unk>"] if kind == "t5" else ["<unk>", "<s>", "</s>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=110, special_tokens=specials)
    tok.train_from_iterator(CORPUS, trainer)
    template = {"opt": "</s> $A", "t5": "$A </s>", "llama": "<s> $A"}[kind]
    special = {"opt": "</s>", "t5": "</s>", "llama": "<s>"}[kind]
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(special, tok.token_to_id(special))]
    )
    return tok


def tokenizer(kind: str):
    """A tiny transformers tokenizer of family ``kind`` ("opt", "t5", "llama")."""
    from transformers import PreTrainedTokenizerFast

    names = {
        "opt": dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"),
        "t5": dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>"),
        "llama": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
    }[kind]
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(kind), **names)


def text_config(kind: str, vocab: int | None = None) -> dict:
    vocab = vocab or LLM_VOCAB[kind]
    if kind == "opt":
        return dict(
            model_type="opt",
            hidden_size=32,
            word_embed_proj_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            vocab_size=vocab,
            max_position_embeddings=128,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        )
    if kind == "llama":
        return dict(
            model_type="llama",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=vocab,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    return dict(
        model_type="t5",
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu",  # what transformers' BLIP-2 FlanT5 folders carry
        vocab_size=vocab,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )


NUM_QUERY = 4


def _vision_qformer(text_input: bool) -> tuple[dict, dict]:
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    qformer = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        cross_attention_frequency=2,
        vocab_size=99,
        max_position_embeddings=64,
    )
    if text_input is False:
        qformer["use_qformer_text_input"] = False
    return vision, qformer


@torch.no_grad()
def _randomize_llm(llm: nn.Module, seed: int, std: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    for param in llm.parameters():
        if param.dim() >= 2:
            param.copy_(torch.randn(param.shape, generator=g) * std)


def hf_blip2(kind: str, seed: int = 0, vocab: int | None = None):
    """A tiny random ``Blip2ForConditionalGeneration`` with an OPT / T5 / LLaMA LLM (image token = vocab-1)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    vision, qformer = _vision_qformer(False)
    text = text_config(kind, vocab)
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=NUM_QUERY,
        image_token_index=text["vocab_size"] - 1,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    randomize(model, seed=seed)
    _randomize_llm(model.language_model, seed + 1, std=LLM_STD[kind])
    if model.language_model.config.tie_word_embeddings:
        model.language_model.tie_weights()
    return model


def hf_instructblip(kind: str, seed: int = 0, vocab: int | None = None):
    """A tiny random ``InstructBlipForConditionalGeneration`` with a LLaMA or T5 LLM."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    vision, qformer = _vision_qformer(True)
    text = text_config(kind, vocab)
    config = InstructBlipConfig(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=NUM_QUERY,
        image_token_index=text["vocab_size"] - 1,
    )
    model = InstructBlipForConditionalGeneration(config).eval()
    randomize(model, seed=seed)
    _randomize_llm(model.language_model, seed + 1, std=LLM_STD[kind])
    return model


def hf_inputs(model, ids: torch.Tensor, mask: torch.Tensor, *, left_pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers 5.x layout: ``num_query_tokens`` image-token ids in front of each row's text.

    With ``left_pad`` the padding goes before the image tokens (transformers' processor layout); otherwise
    the image tokens come first and the text keeps its own (right) padding.
    """
    q = model.config.num_query_tokens
    image = torch.full((ids.shape[0], q), model.config.image_token_index, dtype=ids.dtype)
    ones = torch.ones_like(image)
    if not left_pad:
        return torch.cat([image, ids], 1), torch.cat([ones, mask], 1)
    rows, masks = [], []
    for row, m in zip(ids, mask):
        keep = row[m.bool()]
        pad = ids.shape[1] - keep.shape[0]
        rows.append(torch.cat([row[~m.bool()], image[0], keep]))
        masks.append(torch.cat([torch.zeros(pad, dtype=mask.dtype), ones[0], torch.ones_like(keep)]))
    return torch.stack(rows), torch.stack(masks)


PROJECTION = {"opt": "opt_proj", "t5": "t5_proj", "llama": "llm_proj"}
LLM_PREFIX = {"opt": "opt_model", "t5": "t5_model", "llama": "llm_model"}


def hf_to_lavis(ref, kind: str, *, seed: int = 0) -> tuple[dict, dict]:
    """A LAVIS "trimmed" stage-2 / InstructBLIP checkpoint and its EVA ViT file holding ``ref``'s weights.

    The transformers conversion rules of blip2-spec.md §5.3, inverted: vision -> the separate EVA file (with
    one extra block, as the released file has), ``language_projection`` -> ``opt_proj``/``t5_proj``/``llm_proj``,
    Q-Former -> ``Qformer.bert.*`` (plus the ``position_ids`` buffer every LAVIS file has). The LLM is not in
    the checkpoint (see ``save_llm_folder``), except OPT's tied ``lm_head.weight`` in fp16 (§9.6).
    """
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    width = ref.config.vision_config.hidden_size
    main: dict[str, torch.Tensor] = {}
    vit: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("language_model."):
            continue
        if key.startswith("vision_model."):
            new = key[len("vision_model.") :]
            if new == "post_layernorm.weight" or new == "post_layernorm.bias":
                main["ln_vision." + new.split(".")[-1]] = value
                continue
            new = new.replace("embeddings.class_embedding", "cls_token")
            new = new.replace("embeddings.position_embedding", "pos_embed")
            new = new.replace("embeddings.patch_embedding", "patch_embed.proj")
            new = (
                new.replace("encoder.layers.", "blocks.")
                .replace("layer_norm1", "norm1")
                .replace("layer_norm2", "norm2")
            )
            new = new.replace("self_attn.projection", "attn.proj").replace("self_attn.qkv", "attn.qkv")
            if new.endswith("attn.qkv.bias"):
                prefix = new[: -len("qkv.bias")]
                vit[prefix + "q_bias"], vit[prefix + "v_bias"] = value[:width], value[2 * width :]
                continue
            vit[new] = value
            continue
        new = key.replace("language_projection", PROJECTION[kind])
        new = new.replace("qformer.embeddings.layernorm", "Qformer.bert.embeddings.LayerNorm")
        new = new.replace("qformer.layernorm", "Qformer.bert.embeddings.LayerNorm")
        new = new.replace("qformer.embeddings.", "Qformer.bert.embeddings.")
        new = new.replace("qformer.", "Qformer.bert.").replace(".attention.attention.", ".attention.self.")
        new = new.replace(".crossattention.attention.", ".crossattention.self.")
        main[new] = value
    main["Qformer.bert.embeddings.position_ids"] = torch.arange(ref.config.qformer_config.max_position_embeddings)[None]
    if kind == "opt":
        main["opt_model.lm_head.weight"] = sd["language_model.lm_head.weight"].half()
    depth = ref.config.vision_config.num_hidden_layers
    for name in [k for k in vit if k.startswith("blocks.0.")]:  # the released file's extra last block
        vit[name.replace("blocks.0.", f"blocks.{depth}.")] = torch.randn(vit[name].shape, generator=g)
    return main, vit


def save_llm_folder(ref, path, kind: str, *, drop_rows: int = 0) -> None:
    """The LLM of ``ref`` as a transformers folder with a tiny tokenizer (what ``--llm`` points at).

    ``drop_rows``: store the vocabulary without its last rows (Vicuna before InstructBLIP's ``[PAD]``).
    """
    import copy

    llm = copy.deepcopy(ref.language_model)
    if drop_rows:
        llm.resize_token_embeddings(llm.config.vocab_size - drop_rows, mean_resizing=False)
    llm.save_pretrained(path)
    tok = tokenizer(kind)
    vocab = llm.config.vocab_size
    if drop_rows:  # the real Vicuna tokenizer has exactly the checkpoint's vocabulary
        tok.add_tokens([f"<extra_{i}>" for i in range(vocab - len(tok))])
        assert len(tok) == vocab
    tok.save_pretrained(path)


def write_bert_vocab(path) -> None:
    """A small WordPiece ``vocab.txt`` covering ``CORPUS`` (fits the tiny Q-Formers' vocabularies)."""
    words = sorted({w.strip("?:.") for line in CORPUS for w in line.lower().split()} | {"?", ":", "."})
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n", encoding="utf-8")
