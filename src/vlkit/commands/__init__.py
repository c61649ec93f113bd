"""The per-task commands: ``vlkit caption``, ``vqa``, ``instruct``, ``classify``, ``retrieve``, ``embed``,
``models`` and ``serve`` (one module each, listed in ``vlkit.cli.COMMANDS``; shared options in
:mod:`vlkit.commands.common`)."""
