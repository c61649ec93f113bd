"""Reference-side helpers for the BLIP-2 parity tests, written from the spec, independent of src/.

* ``hf_config``: tiny transformers ``Blip2Config``s.
* ``lavis_stage1``: a LAVIS stage-1 checkpoint and its ViT file, built from the key list of
  blip2-spec.md §5.2 with random values (including the tied/aliased and ignored entries).
* ``lavis_to_hf``: the transformers conversion rules of blip2-spec.md §5.3, applied mechanically (renames,
  "Qformer.bert" -> "qformer", "attention.self" -> "attention.attention", q/v-bias fusion).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def hf_config(
    *,
    vision_width: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 4,
    vision_mlp: int = 37,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 37,
    cross_freq: int = 2,
    vocab: int = 99,
    max_pos: int = 64,
    queries: int = 4,
    embed_dim: int = 16,
    text_input: bool = True,
    vision_eps: float = 1e-6,
):
    from transformers import Blip2Config

    return Blip2Config(
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=vision_mlp,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads,
            image_size=image_size,
            patch_size=patch_size,
            layer_norm_eps=vision_eps,
        ),
        qformer_config=dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
            cross_attention_frequency=cross_freq,
            vocab_size=vocab,
            max_position_embeddings=max_pos,
            use_qformer_text_input=text_input,
        ),
        text_config=dict(
            model_type="opt",
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=20,
            vocab_size=50,
            word_embed_proj_dim=16,
            max_position_embeddings=64,
        ),
        num_query_tokens=queries,
        image_text_hidden_size=embed_dim,
    )


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give every parameter random values (LayerNorm scales around 1) so no mapping error hides behind an init."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        is_norm_scale = p.dim() == 1 and ("norm" in name.lower()) and name.endswith("weight")
        p.copy_(1.0 + noise if is_norm_scale else noise)


def lavis_stage1(
    *,
    vision_width: int,
    depth: int,
    mlp: int,
    image_size: int,
    patch: int,
    hidden: int,
    layers: int,
    intermediate: int,
    cross_freq: int,
    vocab: int,
    max_pos: int,
    queries: int,
    embed_dim: int,
    seed: int = 0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(main checkpoint state dict, EVA ViT file state dict with depth + 1 blocks), per spec §5.2."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, around: float = 0.0) -> Tensor:
        return around + torch.randn(shape, generator=g) * 0.2

    w, d, i_, v = vision_width, hidden, intermediate, vocab
    sd: dict[str, Tensor] = {
        "query_tokens": r(1, queries, d),
        "ln_vision.weight": r(w, around=1.0),
        "ln_vision.bias": r(w),
        "Qformer.bert.embeddings.LayerNorm.weight": r(d, around=1.0),
        "Qformer.bert.embeddings.LayerNorm.bias": r(d),
        "Qformer.bert.embeddings.position_ids": torch.arange(max_pos).unsqueeze(0),
        "Qformer.bert.embeddings.word_embeddings.weight": r(v, d),
        "Qformer.bert.embeddings.position_embeddings.weight": r(max_pos, d),
    }

    def linear(prefix: str, out_dim: int, in_dim: int) -> None:
        sd[f"{prefix}.weight"] = r(out_dim, in_dim)
        sd[f"{prefix}.bias"] = r(out_dim)

    def norm(prefix: str, dim: int) -> None:
        sd[f"{prefix}.weight"] = r(dim, around=1.0)
        sd[f"{prefix}.bias"] = r(dim)

    for n in range(layers):
        p = f"Qformer.bert.encoder.layer.{n}"
        for name in ("query", "key", "value"):
            linear(f"{p}.attention.self.{name}", d, d)
        linear(f"{p}.attention.output.dense", d, d)
        norm(f"{p}.attention.output.LayerNorm", d)
        if n % cross_freq == 0:
            linear(f"{p}.crossattention.self.query", d, d)
            linear(f"{p}.crossattention.self.key", d, w)
            linear(f"{p}.crossattention.self.value", d, w)
            linear(f"{p}.crossattention.output.dense", d, d)
            norm(f"{p}.crossattention.output.LayerNorm", d)
        linear(f"{p}.intermediate_query.dense", i_, d)
        linear(f"{p}.output_query.dense", d, i_)
        norm(f"{p}.output_query.LayerNorm", d)
        linear(f"{p}.intermediate.dense", i_, d)
        linear(f"{p}.output.dense", d, i_)
        norm(f"{p}.output.LayerNorm", d)
    sd["Qformer.cls.predictions.bias"] = r(v)
    linear("Qformer.cls.predictions.transform.dense", d, d)
    norm("Qformer.cls.predictions.transform.LayerNorm", d)
    # Tied in LAVIS: the decoder weight *is* the word embedding matrix, its bias *is* predictions.bias.
    sd["Qformer.cls.predictions.decoder.weight"] = sd["Qformer.bert.embeddings.word_embeddings.weight"]
    sd["Qformer.cls.predictions.decoder.bias"] = sd["Qformer.cls.predictions.bias"]
    linear("vision_proj", embed_dim, d)
    linear("text_proj", embed_dim, d)
    linear("itm_head", 2, d)
    sd["temp"] = torch.tensor(0.05)

    grid = image_size // patch
    vit: dict[str, Tensor] = {
        "cls_token": r(1, 1, w),
        "pos_embed": r(1, grid * grid + 1, w),
        "patch_embed.proj.weight": r(w, 3, patch, patch),
        "patch_embed.proj.bias": r(w),
    }
    for i in range(depth + 1):  # the released file has one block more than BLIP-2 uses
        p = f"blocks.{i}"
        vit[f"{p}.norm1.weight"], vit[f"{p}.norm1.bias"] = r(w, around=1.0), r(w)
        vit[f"{p}.attn.qkv.weight"] = r(3 * w, w)
        vit[f"{p}.attn.q_bias"], vit[f"{p}.attn.v_bias"] = r(w), r(w)
        vit[f"{p}.attn.proj.weight"], vit[f"{p}.attn.proj.bias"] = r(w, w), r(w)
        vit[f"{p}.norm2.weight"], vit[f"{p}.norm2.bias"] = r(w, around=1.0), r(w)
        vit[f"{p}.mlp.fc1.weight"], vit[f"{p}.mlp.fc1.bias"] = r(mlp, w), r(mlp)
        vit[f"{p}.mlp.fc2.weight"], vit[f"{p}.mlp.fc2.bias"] = r(w, mlp), r(w)
    return sd, vit


def lavis_to_hf(main: dict[str, Tensor], vit: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """Apply the transformers conversion rules (spec §5.3) to a full LAVIS stage-1 model."""
    full = {k: v for k, v in main.items()}
    for k, v in vit.items():
        if k.startswith("blocks."):
            if int(k.split(".")[1]) >= depth:
                continue  # not part of the 39-block (here: depth-block) model
        full["visual_encoder." + k] = v
    out: dict[str, Tensor] = {}
    for key, value in full.items():
        if key == "Qformer.bert.embeddings.position_ids" or key.startswith("Qformer.cls.") or key == "temp":
            continue  # dropped by the transformers conversion
        new = key
        new = new.replace("visual_encoder.cls_token", "vision_model.embeddings.class_embedding")
        new = new.replace("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding")
        new = new.replace("visual_encoder.patch_embed.proj", "vision_model.embeddings.patch_embedding")
        new = new.replace("visual_encoder.blocks.", "vision_model.encoder.layers.")
        new = new.replace(".norm1.", ".layer_norm1.").replace(".norm2.", ".layer_norm2.")
        new = new.replace(".attn.qkv.", ".self_attn.qkv.").replace(".attn.proj.", ".self_attn.projection.")
        new = new.replace("ln_vision.", "vision_model.post_layernorm.")
        new = new.replace("Qformer.bert.embeddings.LayerNorm", "qformer.layernorm")
        new = new.replace("Qformer.bert.embeddings.", "embeddings.")
        new = new.replace("Qformer.bert", "qformer")
        if "attention.self" in new:
            new = new.replace("self", "attention")
        new = new.replace("vision_proj.", "vision_projection.").replace("text_proj.", "text_projection.")
        out[new] = value
    # q/v-bias fusion: qkv.bias = [q_bias, 0, v_bias]
    for key in [k for k in out if k.endswith(".attn.q_bias")]:
        prefix = key[: -len(".attn.q_bias")]
        q, v = out.pop(key), out.pop(prefix + ".attn.v_bias")
        out[prefix + ".self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out
