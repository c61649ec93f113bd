"""``vlkit models``: the model names ``vlkit.load`` and every ``--model`` option accept.

Bundled models load offline right away; the real-size presets need their original weights converted once
(``vlkit convert``, the NEEDS column says from which files).
"""

from __future__ import annotations

from vlkit.commands import common


def main(argv: list[str]) -> int:
    p = common.ArgumentParser(prog="vlkit models", description=__doc__)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--available", action="store_true", help="only the models that load offline now")
    args = p.parse_args(argv)
    from vlkit.api import models

    infos = [m for m in models() if m.available or not args.available]
    payload = [
        {
            "name": m.name,
            "arch": m.arch,
            "tasks": list(m.tasks),
            "available": m.available,
            "needs": m.needs,
            "description": m.description,
        }
        for m in infos
    ]
    rows = [(m.name, m.arch, ",".join(m.tasks), "yes" if m.available else "no", m.needs) for m in infos]
    common.emit(args, payload, rows, ("name", "arch", "tasks", "available", "needs"))
    return 0
