"""Literal key maps that account for every key of a checkpoint.

A converter is a dict from source key pattern to target key pattern. Patterns may contain ``{name}``
placeholders that match a run of digits (layer indices) and are substituted into the target. A target of
``None`` means "dropped on purpose" and must be justified by a comment at the map. Any source key that no
pattern matches is an error, and so is any target key of the model that the checkpoint did not provide:
nothing is ever loaded silently with ``strict=False``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache

import torch
from torch import Tensor, nn

from vlkit.errors import CheckpointError

KeyMap = Mapping[str, "str | None"]


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\w+\})", pattern)
    regex = "".join(f"(?P<{p[1:-1]}>\\d+)" if p.startswith("{") and p.endswith("}") else re.escape(p) for p in parts)
    return re.compile(regex + r"\Z")


def _listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def map_keys(state_dict: Mapping[str, Tensor], key_map: KeyMap, *, source: str = "checkpoint") -> dict[str, Tensor]:
    """Rename every key of ``state_dict`` through ``key_map``.

    Args:
        state_dict: source tensors.
        key_map: source pattern -> target pattern (or None to drop). Exact keys are tried first, then
            patterns in insertion order.
        source: a name for the checkpoint, used in error messages.

    Returns:
        The renamed state dict (tensors are not copied).

    Raises:
        CheckpointError: if any source key matches no pattern, or two source keys map to one target.
    """
    out: dict[str, Tensor] = {}
    unmatched: list[str] = []
    patterns = [(p, t) for p, t in key_map.items() if "{" in p]
    for key, value in state_dict.items():
        if key in key_map:
            target = key_map[key]
        else:
            for pattern, tgt in patterns:
                m = _compile(pattern).match(key)
                if m:
                    target = None if tgt is None else tgt.format(**m.groupdict())
                    break
            else:
                unmatched.append(key)
                continue
        if target is None:
            continue
        if target in out:
            raise CheckpointError(f"{source}: two keys map to {target!r}")
        out[target] = value
    if unmatched:
        raise CheckpointError(
            f"{source}: {len(unmatched)} unexpected key(s) that no rule accounts for: {_listing(unmatched)}"
        )
    return out


def load_exact(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str = "checkpoint",
    allow_missing: Callable[[str], bool] | None = None,
) -> None:
    """Load ``state_dict`` into ``model``, requiring keys and shapes to match exactly.

    Args:
        model: target module.
        state_dict: tensors keyed like ``model.state_dict()``.
        source: name used in error messages.
        allow_missing: predicate for keys the caller fills elsewhere (e.g. a frozen LLM loaded separately).

    Raises:
        CheckpointError: listing missing keys, unexpected keys and shape mismatches.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not (allow_missing and allow_missing(k))]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch for {len(wrong)} key(s): {'; '.join(wrong[:10])}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + " | ".join(problems))
    with torch.no_grad():
        result = model.load_state_dict(dict(state_dict), strict=False, assign=False)
    # Everything was checked above; strict=False only lets allow_missing keys stay as they are.
    assert not result.unexpected_keys, result.unexpected_keys
