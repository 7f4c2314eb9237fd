"""Config trust: which ``_target_`` the shipped config tree names where, and whether a config's keys
fit their targets.

A checkpoint's stored config is data from the internet: ``check_config`` refuses any target the
shipped tree does not name at that place (and any Hydra key or interpolation that could change
what runs), and ``check_params`` refuses keys a target does not take or of the wrong type, each
with one line naming the key. ``diffx.validate`` runs ``check_params`` on a user's own config too.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from functools import lru_cache
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from diffx.config import config_dir, options_with_key
from diffx.errors import DiffxError, first_line

# A stored config may carry these Hydra keys; _args_, _recursive_, _convert_ ... could change what
# gets called or how, so they are refused.
_HYDRA_KEYS = {"_target_", "_partial_"}


@lru_cache(maxsize=1)
def target_sites() -> dict[str, dict[str, bool]]:
    """Where the shipped config tree names each ``_target_``: key path in the composed config
    (``"model"``, ``"objective.t_sampler"``) -> {target: is it ``_partial_``}.

    A checkpoint's stored config may name a target only where the shipped tree puts it, so a
    crafted file cannot, say, make its ``model`` a data builder that writes to a path it chooses.
    """
    sites: dict[str, dict[str, bool]] = {}
    for path in sorted(config_dir().rglob("*.yaml")):
        text = path.read_text()
        stack = [(_package(path, text), yaml.safe_load(text))]
        while stack:
            key, node = stack.pop()
            if isinstance(node, dict):
                if isinstance(node.get("_target_"), str):
                    sites.setdefault(key, {})[node["_target_"]] = node.get("_partial_") is True
                stack.extend((_join(key, str(k)), v) for k, v in node.items() if k != "defaults")
            elif isinstance(node, list):
                stack.extend((f"{key}[]", v) for v in node)
    return sites


def check_config(node, where: str) -> None:
    """Refuse a stored config that could run code: a ``_target_`` not named at that place by the
    shipped config tree, a ``_partial_`` that differs from it, other Hydra keys (``_args_``,
    ``_recursive_`` ...), and any string OmegaConf would resolve (``${oc.env:...}``, a resolver)."""
    sites = target_sites()
    stack = [("", node)]
    while stack:
        key, item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if k.startswith("_") and k.endswith("_") and k not in _HYDRA_KEYS:
                    raise DiffxError(f"{where}: stored config has {_join(key, k)}, a Hydra key that checkpoints may "
                                     "not use; refusing to load")
                stack.append((_join(key, k), v))
            if "_target_" in item or "_partial_" in item:
                _check_target(key, item, sites.get(key, {}), where)
        elif isinstance(item, list):
            stack.extend((f"{key}[]", v) for v in item)
        elif isinstance(item, str) and ("${" in item or item == "???"):
            raise DiffxError(f"{where}: stored config {key}={item[:60]!r} is an interpolation or a missing value; "
                             "checkpoints store resolved values only, refusing to load")


def _check_target(key: str, node: dict, allowed: dict[str, bool], where: str) -> None:
    target = node.get("_target_")
    if not isinstance(target, str):
        raise DiffxError(f"{where}: stored config {_join(key, '_target_')} is {type(target).__name__}, "
                         "not a class name; refusing to load")
    if target not in allowed:
        raise DiffxError(f"{where}: stored config names {_join(key, '_target_')}={target!r}, which is not a diffx "
                         f"class for {key or 'the top level'} (allowed: {', '.join(sorted(allowed)) or 'none'}); "
                         "refusing to load")
    if node.get("_partial_", False) is not allowed[target]:
        raise DiffxError(f"{where}: stored config {_join(key, '_partial_')}={node.get('_partial_')!r} differs from "
                         f"diffx's own config for {target}; refusing to load")


def check_params(node: DictConfig, key: str) -> None:
    """Every key of a ``_target_`` node must be a parameter of its target, of the annotated type
    when that is a plain one (recursively): ``objective.prediction`` on ``objective=flow`` or
    ``model.channels=abc`` fail here, naming the key, instead of as a TypeError deep in Hydra."""
    from hydra.utils import get_object

    target = node.get("_target_")
    if target is None:  # a plain mapping (e.g. text_encoder.encoders): its entries may have targets
        for k in node:
            if not OmegaConf.is_interpolation(node, k) and isinstance(node[k], DictConfig):
                check_params(node[k], f"{key}.{k}")
        return
    try:
        params = _signature(get_object(target)).parameters
    except Exception as e:  # noqa: BLE001 - an import error, a typo in _target_
        raise DiffxError(f"{key}._target_={target}: cannot import it ({first_line(e)})") from None
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for k in node:
        if isinstance(k, str) and k.startswith("_"):
            continue
        if not takes_any and k not in params:
            option = _choice(key)
            others = [o for o in options_with_key(key.replace(".", "/"), k) if o != option]
            hint = f"; {k} is a key of {', '.join(f'{key}={o}' for o in others)}" if others else ""
            takes = ", ".join(p for p in params if not p.startswith("_"))
            raise DiffxError(f"{key}.{k} is not a parameter of {key}={option or target} "
                             f"({target} takes {takes}){hint}")
        if OmegaConf.is_interpolation(node, k):  # its value is checked where it is defined
            continue
        value = node[k]
        if isinstance(value, DictConfig):
            check_params(value, f"{key}.{k}")
        elif k in params and not _type_ok(value, params[k].annotation):
            raise DiffxError(f"{key}.{k}={value}: expected {_type_name(params[k].annotation)} "
                             f"(a parameter of {target})")


def _signature(obj) -> inspect.Signature:
    try:
        return inspect.signature(obj, eval_str=True)  # the modules use `from __future__ import annotations`
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate: check names only
        return inspect.signature(obj)


_PLAIN = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_ok(value, annotation) -> bool:
    """Only plain annotations (int, float, bool, str, and unions of them) are checked; null is left
    to the target, as many parameters take it whatever their annotation says."""
    if value is None:
        return True
    kinds = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    if not all(k in _PLAIN or k is type(None) for k in kinds):
        return True
    return any((k is int and isinstance(value, int) and not isinstance(value, bool))
               or (k is float and isinstance(value, (int, float)) and not isinstance(value, bool))
               or (k in (bool, str) and isinstance(value, k)) for k in kinds)


def _type_name(annotation) -> str:
    kinds = typing.get_args(annotation) or (annotation,)
    return " or ".join(_PLAIN[k] for k in kinds if k in _PLAIN)


def _choice(key: str) -> str | None:
    """The option chosen for group ``key`` (``objective`` -> ``flow``) when run by Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(key.replace(".", "/"))


def _package(path: Path, text: str) -> str:
    """The key path a config file lands at: its group folder (``objective/t_sampler`` ->
    ``objective.t_sampler``), unless a ``# @package`` header in its leading comments says otherwise."""
    group = path.parent.relative_to(config_dir()).as_posix()
    default = "" if group == "." else group.replace("/", ".")
    for line in text.splitlines():
        if not line.startswith("#"):
            if line.strip():
                break
            continue
        m = re.match(r"#\s*@package\s+(\S+)", line)
        if m:
            head, _, rest = m.group(1).partition(".")
            base = {"_global_": "", "_group_": default}.get(head)
            if base is None:
                return m.group(1)
            return _join(base, rest) if rest else base
    return default


def _join(prefix: str, key: str) -> str:
    """A key path one level down: ``_join("objective", "t_sampler")`` -> ``objective.t_sampler``."""
    return f"{prefix}.{key}" if prefix else key
