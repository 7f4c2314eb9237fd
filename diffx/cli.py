"""``diffx <command> [overrides]``: each command is a Hydra app over its own config in ``conf/``.

``diffx train --help``, ``--cfg job`` and multirun ``-m`` behave as Hydra users expect. The config is
validated (``diffx.validate``) before the task runs. A user error (a bad override, an unknown option,
a DiffxError) prints one line on stderr and exits 1; set ``HYDRA_FULL_ERROR=1`` or pass ``--verbose``
for the full trace.
"""

from __future__ import annotations

import os
import re
import sys

COMMANDS = {
    "train": ("diffx.train", "train", "train a model (Accelerate, EMA, safetensors checkpoints)"),
    "sample": ("diffx.sample", "sample", "sample PNGs and a grid from a checkpoint"),
    "calibrate": ("diffx.calibrate", "calibrate", "fit a sampler's coefficients and times to a checkpoint"),
    "eval": ("diffx.evaluate", "evaluate", "score prompt adherence of a checkpoint trained on data=shapes"),
    "train-vae": ("diffx.train_vae", "train_vae", "train the KL autoencoder of latent diffusion (vae.safetensors)"),
    "interpolate": ("diffx.interpolate", "interpolate", "slerp between two seeds' noises: a strip PNG and a GIF"),
    "fit-laplace": ("diffx.fit_laplace", "fit_laplace", "fit a Bayesian last layer for per-pixel uncertainty (laplace.safetensors)"),
    "report": ("diffx.report", "report", "a table, report.csv and report.png of a sweep's jobs (diffx train -m)"),
    "distill": ("diffx.distill_cmd", "distill", "retrain a checkpoint into a few-step student (progressive, guided, reflow)"),
}

# What a command's job gives back to Hydra, for a sweeper that optimises a number (hydra/sweeper=optuna):
# the key of <run dir>/metrics.json, e.g. train's final EMA loss on a fixed probe batch (diffx.monitor).
METRICS = {"train": "probe_loss"}

USAGE = "usage: diffx <command> [key=value ...] [hydra flags: --help, --cfg job, -m] [--verbose]\n\ncommands:\n" + "".join(
    f"  {name:<12} {desc}\n" for name, (_, _, desc) in COMMANDS.items()
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
    verbose = "--verbose" in rest or os.environ.get("HYDRA_FULL_ERROR") == "1"
    return _run_hydra(command, quote_free_text([a for a in rest if a != "--verbose"]), verbose)


# Keys whose value is free text, not Hydra syntax: a prompt may hold commas, quotes, brackets or "${".
FREE_TEXT = ("prompt", "negative_prompt")


def quote_free_text(args: list[str]) -> list[str]:
    """``prompt=a red circle, small`` -> ``prompt="a red circle, small"``: Hydra reads an unquoted
    comma as a sweep or an ambiguous value and an apostrophe as the start of a string, so a free-text
    value is handed to Hydra as one quoted string (its quotes, backslashes before them, and ``${``
    escaped). Left as typed: a value already quoted ('...' or "..."), a list ([...]) for several
    prompts, an empty value, and every value under ``-m`` (where a comma means a sweep)."""
    if "-m" in args or "--multirun" in args:
        return args
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+~") in FREE_TEXT and value and value[0] not in "'\"[":
            # backslashes are literal to Hydra except in a run before a quote or the closing quote
            escaped = re.sub(r'(\\*)("|$)', lambda m: 2 * m[1] + ("\\" + m[2] if m[2] else ""), value)
            escaped = escaped.replace("${", "\\${")
            arg = f'{key}="{escaped}"'
        out.append(arg)
    return out


def _run_hydra(command: str, args: list[str], verbose: bool) -> int:
    import importlib

    import hydra
    from omegaconf import DictConfig

    from diffx.config import config_dir, register_resolvers
    from diffx.errors import DiffxError
    from diffx.validate import validate

    register_resolvers()
    module, func, _ = COMMANDS[command]
    failure: list[str] = []
    caller = os.getpid()

    def job(cfg: DictConfig):
        # User errors are caught here, not above Hydra: Hydra would print its own line first.
        try:
            try:
                validate(cfg, command)
            except Exception:
                _discard_fresh_run_dir()
                raise
            # Imported only now: a typo in an override fails without loading torch or Accelerate.
            task = getattr(importlib.import_module(module), func)
            result = task(cfg)
            return _metric(result, METRICS[command]) if command in METRICS else result
        except Exception as e:  # noqa: BLE001 - sorted into user errors (one line) and bugs (re-raised)
            message = user_message(e)
            if verbose or message is None:
                raise
            if os.getpid() != caller:  # a launcher ran this job in another process (joblib, SLURM), where
                # `failure` is not ours: the error goes back in Hydra's job result, raised here after the batch
                raise DiffxError(message) from None
            failure.append(message)

    job.__name__ = command
    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [f"diffx {command}", *args]
    # Without it Hydra prints its own multi-line report and exits; with it, the exception reaches
    # us, and we print one line (or, when verbose, let the full trace through).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(version_base=None, config_path=str(config_dir()), config_name=command.replace("-", "_"))(job)()
    except SystemExit as e:  # --help, --cfg, Hydra's own usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        if verbose:
            raise
        print(f"diffx {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into user errors (one line) and bugs (re-raised)
        message = user_message(e)
        if verbose or message is None:
            raise
        print(f"diffx {command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
    if failure:  # under -m, the first failed job's message (the others ran on)
        print(f"diffx {command}: error: {failure[0]}", file=sys.stderr)
        return 1
    return 0


def _metric(run_dir, key: str):
    """``key`` of the run's metrics.json, or None where there is none (a process other than the main one)."""
    from diffx.plots import read_metrics

    return read_metrics(run_dir).get(key)


def _discard_fresh_run_dir() -> None:
    """A config that fails validation leaves no empty run dir behind: remove the output dir Hydra
    just made for this process (named by its run id), if it holds nothing but Hydra's own files."""
    import shutil
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    from diffx.config import run_id

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    hydra_files = {Path(hc.output_subdir).parts[0] if hc.output_subdir else None, f"{hc.job.name}.log"}
    if out.name == run_id() and out.is_dir() and {p.name for p in out.iterdir()} <= hydra_files:
        shutil.rmtree(out, ignore_errors=True)


def user_message(e: BaseException) -> str | None:
    """One line for an error the user can fix (a config, an override, a file); None for a bug."""
    from hydra.errors import (CompactHydraException, ConfigCompositionException, InstantiationException,
                              MissingConfigException, OverrideParseException)
    from omegaconf.errors import OmegaConfBaseException

    from diffx.errors import as_diffx_error

    cause = as_diffx_error(e)
    if cause is not None:
        return _one_line(str(cause))
    if isinstance(e, MissingConfigException) and e.options and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return f"{group}={option} is not an option; choose one of: {', '.join(e.options)}"
    if isinstance(e, ConfigCompositionException) and isinstance(e.__cause__, OmegaConfBaseException):
        return _unknown_key(e)
    if isinstance(e, OverrideParseException):
        return (f"cannot parse the overrides: {_one_line(str(e).split('See https')[0])}; expected key=value, "
                "e.g. 'model.channel_mult=[1,2]' (https://hydra.cc/docs/advanced/override_grammar/basic/)")
    if isinstance(e, CompactHydraException):  # +key that exists, ~key that does not ...
        return _one_line(str(e).split("Config search path")[0])
    if isinstance(e, InstantiationException):  # a bad value that a constructor rejected with TypeError ...
        return _one_line(str(e)) + " (--verbose for the trace)"
    if isinstance(e, OmegaConfBaseException):  # a missing value or a bad interpolation
        return f"{e.full_key or 'config'}: {_one_line(e.msg or str(e))}"
    return None


def _unknown_key(e) -> str:
    """``train.foo=1`` or ``objective.prediction=v`` on an objective without it: name the key, the
    keys that exist there, the options of the group that have it, and the ``+`` form."""
    from diffx.config import options_with_key

    key = e.__cause__.full_key or "?"
    parent = getattr(e.__cause__, "parent_node", None)
    keys = sorted(k for k in (parent.keys() if hasattr(parent, "keys") else []) if not str(k).startswith("_"))
    where, _, leaf = key.rpartition(".")
    message = f"{key} is not a key of the config"
    if keys:
        message += f" ({where or 'the top level'} has: {', '.join(keys)})"
    elsewhere = options_with_key(where.replace(".", "/"), leaf) if where else []
    if elsewhere:
        message += f"; {leaf} is a key of {', '.join(f'{where}={o}' for o in elsewhere)}"
    add = [line for line in str(e).splitlines() if "use +" in line]
    if add and not elsewhere:
        message += f"; to add a new key, use {add[0].split('use ', 1)[1]}"
    return message


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
