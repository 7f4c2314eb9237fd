"""``diffx <command> [overrides]``: each command is a Hydra app over its own config in ``conf/``.

``diffx train --help``, ``--cfg job`` and multirun ``-m`` behave as Hydra users expect. A user
error (``DiffxError``, a bad override) prints one line; set ``HYDRA_FULL_ERROR=1`` or pass
``--verbose`` for the full trace.
"""

from __future__ import annotations

import os
import sys

COMMANDS = {
    "train": ("diffx.train", "train", "train a model (Accelerate, EMA, safetensors checkpoints)"),
    "sample": ("diffx.sample", "sample", "sample PNGs and a grid from a checkpoint"),
}

USAGE = "usage: diffx <command> [key=value ...] [hydra flags: --help, --cfg job, -m]\n\ncommands:\n" + "".join(
    f"  {name:<8} {desc}\n" for name, (_, _, desc) in COMMANDS.items()
) + "\nexample: diffx train model=unet objective=flow train.steps=1000\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"diffx: unknown command {command!r}; expected one of {', '.join(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        return 2
    verbose = "--verbose" in rest
    rest = [a for a in rest if a != "--verbose"]
    if verbose:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    return _run_hydra(command, rest, verbose or os.environ.get("HYDRA_FULL_ERROR") == "1")


def _run_hydra(command: str, args: list[str], verbose: bool) -> int:
    import importlib

    import hydra
    from omegaconf import DictConfig

    from diffx.config import config_dir, register_resolvers
    from diffx.errors import DiffxError

    register_resolvers()
    module, func, _ = COMMANDS[command]
    task = getattr(importlib.import_module(module), func)
    failure: list[str] = []

    def job(cfg: DictConfig):
        try:
            return task(cfg)
        except DiffxError as e:
            if verbose:
                raise
            failure.append(str(e))

    job.__name__ = command
    sys.argv = [f"diffx {command}", *args]
    try:
        hydra.main(version_base=None, config_path=str(config_dir()), config_name=command)(job)()
    except SystemExit as e:
        return int(e.code or 0)
    if failure:
        print(f"diffx {command}: error: {failure[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
