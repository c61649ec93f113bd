"""microsoft/unilm VLMo checkpoints <-> :class:`vlkit.models.vlmo.VLMo`.

unilm saves its LightningModule's state dict (``.pt``/``.ckpt``): the weights sit under ``state_dict``
(Lightning), ``module`` (DeepSpeed, keys prefixed ``module.``), ``model`` (BEiT style) or at the top level.
Every key is accounted for by :data:`UNILM_KEY_MAP`; the only keys dropped are buffers that vlkit rebuilds
deterministically from the config (the three relative-position index matrices that released files carry,
and the BERT ``position_ids``/``token_type_ids`` buffers).

Loading also does what the reference loader does when the target model differs from the file:

* a relative position table trained for another resolution is resampled (``layers.relpos``);
* base_plus's absolute image positions are resized bicubically (CLS row kept);
* a longer text position table is truncated to ``max_text_len``;
* a 2-row modality embedding is extended to 3 rows for NLVR2 (row 2 copied from row 1).

Task heads must match exactly unless the caller says otherwise: ``init_heads`` names heads the model has
but the file lacks (they keep their fresh initialisation, e.g. a VQA classifier on a pretrained
backbone), ``drop_heads`` names heads the file has but the model does not (e.g. the pretraining heads).
"""

from __future__ import annotations

import os
import types
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vlkit.checkpoints.io import read_checkpoint, save_torch
from vlkit.checkpoints.keymap import load_exact, map_keys
from vlkit.config import from_dict
from vlkit.errors import CheckpointError, ConfigError
from vlkit.layers import relpos
from vlkit.models.vlmo import VLMO_PRESETS, VLMo, VLMoConfig

# unilm key -> vlkit key. ``{i}`` is a block index.
UNILM_KEY_MAP: dict[str, str | None] = {
    "transformer.cls_token": "cls_token",
    "transformer.pos_embed": "pos_embed",
    "transformer.patch_embed.proj.weight": "patch_embed.weight",
    "transformer.patch_embed.proj.bias": "patch_embed.bias",
    "transformer.norm.weight": "norm.weight",
    "transformer.norm.bias": "norm.bias",
    "relative_position_bias_table": "rel_pos_table",
    "text_embeddings.word_embeddings.weight": "text_embed.word.weight",
    "text_embeddings.position_embeddings.weight": "text_embed.position.weight",
    "text_embeddings.token_type_embeddings.weight": "text_embed.token_type.weight",
    "text_embeddings.LayerNorm.weight": "text_embed.norm.weight",
    "text_embeddings.LayerNorm.bias": "text_embed.norm.bias",
    "token_type_embeddings.weight": "token_type.weight",
    "pooler.dense.weight": "pooler.weight",
    "pooler.dense.bias": "pooler.bias",
    "mlm_score.transform.dense.weight": "mlm_head.dense.weight",
    "mlm_score.transform.dense.bias": "mlm_head.dense.bias",
    "mlm_score.transform.LayerNorm.weight": "mlm_head.norm.weight",
    "mlm_score.transform.LayerNorm.bias": "mlm_head.norm.bias",
    "mlm_score.decoder.weight": "mlm_head.decoder.weight",
    "mlm_score.bias": "mlm_head.bias",
    "itm_score.fc.weight": "itm_head.weight",
    "itm_score.fc.bias": "itm_head.bias",
    "itc_text_proj.fc.weight": "itc_text_proj.weight",
    "itc_image_proj.fc.weight": "itc_image_proj.weight",
    "itc_vl_text_proj.fc.weight": "itc_vl_text_proj.weight",
    "itc_vl_image_proj.fc.weight": "itc_vl_image_proj.weight",
    "logit_scale": "logit_scale",
    "logit_vl_scale": "logit_vl_scale",
    "vqa_classifier.0.weight": "vqa_head.fc1.weight",
    "vqa_classifier.0.bias": "vqa_head.fc1.bias",
    "vqa_classifier.1.weight": "vqa_head.norm.weight",
    "vqa_classifier.1.bias": "vqa_head.norm.bias",
    "vqa_classifier.3.weight": "vqa_head.fc2.weight",
    "vqa_classifier.3.bias": "vqa_head.fc2.bias",
    "nlvr2_classifier.0.weight": "nlvr2_head.fc1.weight",
    "nlvr2_classifier.0.bias": "nlvr2_head.fc1.bias",
    "nlvr2_classifier.1.weight": "nlvr2_head.norm.weight",
    "nlvr2_classifier.1.bias": "nlvr2_head.norm.bias",
    "nlvr2_classifier.3.weight": "nlvr2_head.fc2.weight",
    "nlvr2_classifier.3.bias": "nlvr2_head.fc2.bias",
    # Index matrices of the relative position bias: pure functions of the grid and text length, rebuilt by
    # the model (released files carry them as stale buffers; text_imag_... is even stored as float32).
    "relative_position_index": None,
    "text_relative_position_index": None,
    "text_imag_relative_position_index": None,
    # BERT's arange / zeros buffers (persistent in transformers 4.8, later non-persistent).
    "text_embeddings.position_ids": None,
    "text_embeddings.token_type_ids": None,
}
_BLOCK_KEYS = {
    "gamma_1": "gamma_1",
    "gamma_2": "gamma_2",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.q_bias": "attn.q_bias",
    "attn.v_bias": "attn.v_bias",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
}
for _src, _dst in (("text", "text"), ("imag", "image"), ("vl", "vl")):
    for _p in ("weight", "bias"):
        _BLOCK_KEYS[f"norm2_{_src}.{_p}"] = f"norm_{_dst}.{_p}"
        for _fc in ("fc1", "fc2"):
            _BLOCK_KEYS[f"mlp_{_src}.{_fc}.{_p}"] = f"ffn_{_dst}.{_fc}.{_p}"
for _src, _dst in _BLOCK_KEYS.items():
    UNILM_KEY_MAP[f"transformer.blocks.{{i}}.{_src}"] = f"blocks.{{i}}.{_dst}"
del _src, _dst, _p, _fc

# vlkit key prefix -> head name (as in ``VLMoConfig.heads``); anything else is backbone.
_HEAD_PREFIXES: dict[str, str] = {
    "mlm_head.": "mlm",
    "itm_head.": "itm",
    "itc_vl_text_proj.": "itc",
    "itc_vl_image_proj.": "itc",
    "logit_vl_scale": "itc",
    "itc_text_proj.": "itc/irtr",
    "itc_image_proj.": "itc/irtr",
    "logit_scale": "itc/irtr",
    "vqa_head.": "vqa",
    "nlvr2_head.": "nlvr2",
}
# vlkit key -> unilm key (export).
_EXPORT_MAP: dict[str, str] = {v: k for k, v in UNILM_KEY_MAP.items() if v is not None}


def unilm_key(key: str) -> str | None:
    """The unilm name of a vlkit VLMo state-dict key (``blocks.3.norm_text.weight`` ->
    ``transformer.blocks.3.norm2_text.weight``), or None for a key VLMo does not have."""
    try:
        (name,) = map_keys({key: torch.empty(0)}, _EXPORT_MAP, source="vlkit VLMo")
    except CheckpointError:
        return None
    return name


def head_of(key: str) -> str | None:
    """The task head a vlkit key belongs to ("itc/irtr" for the projections both share), or None for backbone."""
    for prefix, head in _HEAD_PREFIXES.items():
        if key == prefix or key.startswith(prefix):
            return head
    return None


def _head_matches(head: str, names: Iterable[str]) -> bool:
    names = set(names)
    return any(part in names for part in head.split("/"))


def _head_names(groups: Iterable[str]) -> list[str]:
    """Config head names for key groups: the shared ITC projections count as "itc" next to the VL ones,
    else as "irtr"."""
    groups = set(groups)
    if "itc/irtr" in groups:
        groups.discard("itc/irtr")
        groups.add("itc" if "itc" in groups else "irtr")
    return sorted(groups)


# ------------------------------------------------------------------------------------------------ reading


class _Inert(dict):
    """Stand-in for any non-tensor class in a pickle: absorbs arguments, state, items, never runs code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.__dict__["_args"] = (args, kwargs)

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def append(self, item: Any) -> None:
        self.__dict__.setdefault("_items", []).append(item)

    def extend(self, items: Iterable[Any]) -> None:
        self.__dict__.setdefault("_items", []).extend(items)


def _inert_pickle_module() -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` that resolves only the globals torch's weights-only loader allows
    (tensor rebuilding, dtypes, OrderedDict, ...) and turns every other class or function into an inert
    stand-in, so no code from the file ever runs."""
    import pickle

    from torch import _weights_only_unpickler

    allowed = _weights_only_unpickler._get_allowed_globals()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            full = f"{module}.{name}"
            if full in allowed:
                return allowed[full]
            return type(name, (_Inert,), {"__module__": f"<inert {module}>"})

    module = types.ModuleType("vlkit_inert_pickle")
    module.Unpickler = Unpickler  # type: ignore[attr-defined]
    module.load = lambda f, **kw: Unpickler(f, **kw).load()  # type: ignore[attr-defined]
    module.__dict__["UnpicklingError"] = pickle.UnpicklingError
    return module


def read_unilm_file(path: str | os.PathLike) -> Any:
    """Read a unilm ``.pt``/``.ckpt`` without executing pickled code.

    ``torch.load(weights_only=True)`` is tried first. Lightning checkpoints may also pickle the training
    config (sacred ``ReadOnlyDict``, Lightning objects), which the weights-only loader refuses; those objects
    are then replaced by inert stand-ins (only their names are resolved, their code is never imported or run)
    and the tensors are read as usual.
    """
    path = Path(path)
    try:
        return read_checkpoint(path)
    except CheckpointError as err:
        if not zipfile.is_zipfile(path):
            raise
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - any failure here means "not a readable torch zip file"
            raise err from None
        if not unsafe:
            raise
        try:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_inert_pickle_module())
        except Exception as inner:  # noqa: BLE001 - torch/pickle raise many types
            raise CheckpointError(f"{path}: cannot be read ({type(inner).__name__}: {inner})") from inner


def unilm_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, Tensor]:
    """The weights inside a loaded unilm checkpoint: the first of ``state_dict``, ``module`` (``module.``
    prefix stripped), ``model``, else the object itself (the reference loader's order)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict, got {type(obj).__name__}")
    sd: Any = obj
    for key in ("state_dict", "module", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            sd = obj[key]
            if key == "module":
                sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
            break
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{source}: no unilm state dict found (non-tensor entries: {', '.join(map(str, bad[:8]))})"
        )
    return dict(sd)


def read_unilm_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """:func:`read_unilm_file` + :func:`unilm_state_dict`."""
    return unilm_state_dict(read_unilm_file(path), source=str(path))


# ------------------------------------------------------------------------------------------- inspecting


def infer_unilm_config(sd: Mapping[str, Tensor], *, source: str = "checkpoint", **overrides: Any) -> VLMoConfig:
    """Derive the :class:`VLMoConfig` a unilm state dict was saved from.

    Width, depth, VL-expert start, position type, layer scale, patch size, image size (from the bias table
    rows or the absolute positions), text length, vocabulary and heads come from the tensors. Heads are
    counted from the bias table columns, or for absolute models taken from the matching preset.
    ``overrides`` replace derived fields (e.g. ``image_size=480`` to build a model that loads the file with
    resizing).

    Raises:
        CheckpointError: if the keys do not look like a VLMo checkpoint.
    """

    def need(key: str) -> Tensor:
        if key not in sd:
            raise CheckpointError(f"{source}: not a unilm VLMo state dict (no {key!r})")
        return sd[key]

    hidden = need("transformer.cls_token").shape[-1]
    patch = need("transformer.patch_embed.proj.weight").shape[-1]
    blocks = {int(k.split(".")[2]) for k in sd if k.startswith("transformer.blocks.")}
    depth = max(blocks) + 1 if blocks else 0
    vl_layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("transformer.blocks.") and ".mlp_vl." in k})
    start = vl_layers[0] if vl_layers else depth
    absolute = "transformer.pos_embed" in sd
    text_len = need("text_embeddings.position_embeddings.weight").shape[0]
    t0 = int(overrides.get("max_text_len_of_initckpt", 196))
    if absolute:
        grid2 = sd["transformer.pos_embed"].shape[1] - 1
        grid = int(round(grid2**0.5))
        presets = [p for p in VLMO_PRESETS.values() if p["hidden_size"] == hidden and p.get("position") == "absolute"]
        num_heads = overrides.get("num_heads", presets[0]["num_heads"] if presets else None)
        if num_heads is None:
            raise CheckpointError(
                f"{source}: cannot tell the number of heads of an absolute-position model; pass num_heads"
            )
    else:
        table = need("relative_position_bias_table")
        if "relative_position_index" in sd and "max_text_len_of_initckpt" not in overrides:
            # Released files carry the image index matrix, which fixes the grid and hence T0.
            side = int(round((sd["relative_position_index"].shape[0] - 1) ** 0.5))
            t0 = (table.shape[0] - relpos.num_image_distances(side) - 2) // 2
        grid_or_none = relpos.grid_from_table_rows(table.shape[0], t0)
        if grid_or_none is None:
            raise CheckpointError(f"{source}: bias table with {table.shape[0]} rows fits no square grid (T0 = {t0})")
        grid = grid_or_none
        num_heads = table.shape[1] // depth
    heads: list[str] = []
    if "mlm_score.decoder.weight" in sd:
        heads.append("mlm")
    if "itm_score.fc.weight" in sd:
        heads.append("itm")
    if "itc_vl_text_proj.fc.weight" in sd:
        heads.append("itc")
    elif "itc_text_proj.fc.weight" in sd:
        heads.append("irtr")
    if "vqa_classifier.3.weight" in sd:
        heads.append("vqa")
    if "nlvr2_classifier.3.weight" in sd:
        heads.append("nlvr2")
    data: dict[str, Any] = {
        "hidden_size": hidden,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": need("transformer.blocks.0.mlp_text.fc1.weight").shape[0] / hidden,
        "vlffn_start_layer": start,
        "position": "absolute" if absolute else "relative",
        "layer_scale_init": 0.1 if "transformer.blocks.0.gamma_1" in sd else None,
        "image_size": grid * patch,
        "patch_size": patch,
        "max_text_len": text_len,
        "max_text_len_of_initckpt": t0,
        "vocab_size": need("text_embeddings.word_embeddings.weight").shape[0],
        "heads": heads,
    }
    if "vqa_classifier.3.weight" in sd:
        data["vqa_num_labels"] = sd["vqa_classifier.3.weight"].shape[0]
    data.update(overrides)
    try:
        return from_dict(VLMoConfig, data)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from err


# ------------------------------------------------------------------------------------------- converting


@dataclass
class UnilmLoadReport:
    """What a conversion changed besides renaming keys.

    Attributes:
        resized: human-readable notes (bias table / positions resampled, text positions truncated, ...).
        dropped_heads: heads present in the file and discarded (``drop_heads``).
        initialised_heads: heads of the model absent from the file (``init_heads``), left as initialised.
    """

    resized: list[str] = field(default_factory=list)
    dropped_heads: list[str] = field(default_factory=list)
    initialised_heads: list[str] = field(default_factory=list)


def _expected_keys(config: VLMoConfig) -> dict[str, tuple[int, ...]]:
    model = VLMo(config, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_unilm_state_dict(
    sd: Mapping[str, Tensor],
    config: VLMoConfig,
    *,
    source: str = "checkpoint",
    init_heads: Iterable[str] = (),
    drop_heads: Iterable[str] = (),
    layout: Literal["unilm", "vlkit"] = "unilm",
) -> tuple[dict[str, Tensor], UnilmLoadReport]:
    """Rename a unilm state dict to vlkit keys and adapt it to ``config`` (see the module docstring).

    Args:
        sd: unilm keys (as in the file, without ``module.``), or vlkit keys with ``layout="vlkit"``.
        config: the target model's config.
        source: name for error messages.
        init_heads: heads the model has that the file may lack.
        drop_heads: heads the file may have that the model lacks.
        layout: "vlkit" for the state dict of a vlkit VLMo (a vlkit folder): the same adaptation without the
            renaming, for models the unilm layout cannot hold (a conv stem); errors then name vlkit keys.

    Returns:
        (vlkit state dict, report). Heads listed in ``init_heads`` may be missing from it.

    Raises:
        CheckpointError: listing unknown keys, missing or surplus heads, backbone mismatches, shape errors.
    """
    init_heads, drop_heads = tuple(init_heads), tuple(drop_heads)
    report = UnilmLoadReport()
    out = map_keys(sd, UNILM_KEY_MAP, source=source) if layout == "unilm" else dict(sd)
    expected = _expected_keys(config)
    file_names: Callable[[Iterable[str]], list[str]] = _as_unilm if layout == "unilm" else sorted

    # Heads first, so that errors about them are reported as such.
    surplus = {head_of(k) for k in out if k not in expected and head_of(k)}
    not_dropped = {h for h in surplus if not _head_matches(h, drop_heads)}  # type: ignore[arg-type]
    if not_dropped:
        keys = file_names(k for k in out if k not in expected and head_of(k) in not_dropped)
        names = _head_names(not_dropped)  # type: ignore[arg-type]
        raise CheckpointError(
            f"{source}: has task heads the model was not built with ({', '.join(names)}): "
            f"{', '.join(keys[:12])}; build the model with these heads or pass drop_heads={tuple(names)!r}"
        )
    for k in [k for k in out if k not in expected and head_of(k)]:
        del out[k]
    report.dropped_heads = _head_names(surplus)  # type: ignore[arg-type]
    absent = {head_of(k) for k in expected if k not in out and head_of(k)}
    not_init = {h for h in absent if not _head_matches(h, init_heads)}  # type: ignore[arg-type]
    if not_init:
        keys = sorted(k for k in expected if k not in out and head_of(k) in not_init)
        names = _head_names(not_init)  # type: ignore[arg-type]
        raise CheckpointError(
            f"{source}: lacks task heads the model has ({', '.join(names)}): {', '.join(keys[:12])}; "
            f"pass init_heads={tuple(names)!r} to keep them freshly initialised"
        )
    report.initialised_heads = _head_names(absent)  # type: ignore[arg-type]

    _adapt_positions(out, config, expected, report, source)

    unexpected = file_names(k for k in out if k not in expected)
    missing = sorted(k for k in expected if k not in out and head_of(k) is None)
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) in the file: {', '.join(unexpected[:12])}")
        if missing:
            parts.append(f"missing {len(missing)} model key(s): {', '.join(missing[:12])}")
        raise CheckpointError(
            f"{source}: backbone does not match the config (depth {config.depth}, vlffn_start_layer "
            f"{config.vlffn_start_layer}, position {config.position!r}, layer scale "
            f"{config.layer_scale_init}): " + " | ".join(parts)
        )
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {expected[k]}" for k, v in out.items() if tuple(v.shape) != expected[k]
    ]
    if wrong:
        raise CheckpointError(f"{source}: shape mismatch for {len(wrong)} key(s): {'; '.join(wrong[:8])}")
    return out, report


def _as_unilm(keys: Iterable[str]) -> list[str]:
    """vlkit keys renamed back to the file's (unilm) names, sorted, for error messages."""
    return sorted(map_keys(dict.fromkeys(keys, torch.empty(0)), _EXPORT_MAP, source="vlkit VLMo"))


def _adapt_positions(
    out: dict[str, Tensor],
    config: VLMoConfig,
    expected: Mapping[str, tuple[int, ...]],
    report: UnilmLoadReport,
    source: str,
) -> None:
    """Resize position tables and modality embeddings to the target config, in place."""
    key = "text_embed.position.weight"
    if key in out and out[key].shape[0] != config.max_text_len:
        rows = out[key].shape[0]
        if rows < config.max_text_len:
            raise CheckpointError(
                f"{source}: text position table has {rows} rows, fewer than max_text_len {config.max_text_len}"
            )
        out[key] = out[key][: config.max_text_len]
        report.resized.append(f"text positions truncated from {rows} to {config.max_text_len}")

    key = "rel_pos_table"
    if key in out and key in expected and out[key].shape[0] != expected[key][0]:
        rows = out[key].shape[0]
        src = relpos.grid_from_table_rows(rows, config.max_text_len_of_initckpt)
        if src is None:
            raise CheckpointError(
                f"{source}: relative_position_bias_table has {rows} rows, which fits no square patch grid with "
                f"max_text_len_of_initckpt={config.max_text_len_of_initckpt} (the model expects {expected[key][0]})"
            )
        if 2 * src - 1 < 4:
            raise CheckpointError(f"{source}: a {src}x{src} patch grid is too small to resample its bias table")
        out[key] = relpos.resize_bias_table(out[key], config.grid, config.max_text_len_of_initckpt)
        report.resized.append(
            f"relative position bias resampled from a {src}x{src} to a {config.grid}x{config.grid} grid"
        )

    key = "pos_embed"
    if key in out and key in expected and out[key].shape[1] != expected[key][1]:
        out[key] = _resize_abs_positions(out[key], config.grid, source)
        report.resized.append(f"absolute image positions resized to a {config.grid}x{config.grid} grid")

    key = "token_type.weight"
    if key in out and out[key].shape[0] == 2 and config.num_token_types == 3:
        # NLVR2 from a 2-type checkpoint: the second image starts as a copy of the first image type.
        out[key] = torch.cat([out[key], out[key][1:2]], dim=0)
        report.resized.append("token types extended from 2 to 3 rows (row 2 = row 1) for NLVR2")


def _resize_abs_positions(pos: Tensor, grid: int, source: str) -> Tensor:
    """(1, 1 + S*S, H) -> (1, 1 + grid*grid, H): CLS kept, the grid resized bicubically (align_corners=False)."""
    n = pos.shape[1] - 1
    side = int(round(n**0.5))
    if side * side != n:
        raise CheckpointError(f"{source}: transformer.pos_embed has {n} patch positions, not a square grid")
    h = pos.shape[-1]
    patches = pos[:, 1:].reshape(1, side, side, h).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, h).to(pos.dtype)
    return torch.cat([pos[:, :1], patches], dim=1)


def load_unilm(
    model: VLMo,
    checkpoint: str | os.PathLike | Mapping[str, Tensor],
    *,
    init_heads: Iterable[str] = (),
    drop_heads: Iterable[str] = (),
    layout: Literal["unilm", "vlkit"] = "unilm",
) -> UnilmLoadReport:
    """Load a unilm checkpoint (file or state dict) into ``model``, adapting resolution/text length/token types.

    ``layout="vlkit"`` loads the state dict of another vlkit VLMo the same way (see
    :func:`convert_unilm_state_dict`).

    Raises:
        CheckpointError: see :func:`convert_unilm_state_dict`.
    """
    if isinstance(checkpoint, Mapping):
        source, sd = "state dict", unilm_state_dict(checkpoint)
    else:
        source, sd = str(checkpoint), read_unilm_state_dict(checkpoint)
    converted, report = convert_unilm_state_dict(
        sd, model.config, source=source, init_heads=init_heads, drop_heads=drop_heads, layout=layout
    )
    initialised = set(report.initialised_heads)
    allow: Callable[[str], bool] = lambda k: head_of(k) in initialised  # noqa: E731
    load_exact(model, converted, source=source, allow_missing=allow)
    return report


# --------------------------------------------------------------------------------------------- exporting


def export_unilm_state_dict(model: VLMo, *, reference_buffers: bool = True) -> dict[str, Tensor]:
    """``model``'s weights in the unilm layout (the reference ``VLMo`` LightningModule's keys).

    Args:
        model: the model.
        reference_buffers: also write the buffers released files carry (``text_embeddings.position_ids`` and,
            for relative models, the three index matrices with the reference's dtypes), so that the file
            also goes through the reference loader's resolution-change branch.

    Returns:
        unilm key -> tensor (on the CPU, detached).

    Raises:
        ConfigError: for a model with a conv stem (the reference has a one-conv patch embedding only).
    """
    if model.config.stem != "patch":
        raise ConfigError(
            f"the unilm VLMo has a one-conv patch embedding; a {model.config.stem} stem cannot be exported"
        )
    own = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = map_keys(own, _EXPORT_MAP, source="vlkit VLMo")
    if reference_buffers:
        c = model.config
        out["text_embeddings.position_ids"] = torch.arange(c.max_text_len)[None]
        if c.position == "relative":
            out["relative_position_index"] = model.relative_position_index("image")
            out["text_relative_position_index"] = model.relative_position_index("text", c.max_text_len)
            out["text_imag_relative_position_index"] = model.relative_position_index("fusion", c.max_text_len).float()
    return out


def save_unilm_checkpoint(model: VLMo, path: str | os.PathLike, *, reference_buffers: bool = True) -> None:
    """Write ``{"state_dict": export_unilm_state_dict(model)}`` atomically with ``torch.save``."""
    save_torch({"state_dict": export_unilm_state_dict(model, reference_buffers=reference_buffers)}, path)
