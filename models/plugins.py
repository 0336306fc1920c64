"""User code named as ``package.module:attribute`` (a model factory, a trainer)."""
from __future__ import annotations

import importlib
import re

from dpmem.privacy.errors import ConfigError

_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_import_path(text: str) -> bool:
    """True for ``package.module:attribute`` (the attribute may be dotted: ``module:Class.method``)."""
    return bool(_PATH.match(text))


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``, for one-line error reports."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def load_callable(path: str, field: str):
    """Import ``package.module:attribute`` and return it; a ConfigError on ``field`` if that fails."""
    if not is_import_path(path):
        raise ConfigError(field, f"{path!r} is not of the form package.module:attribute")
    module_name, attribute = path.split(":")
    try:
        obj = importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - sys.exit() in user code included: reported, not raised
        raise ConfigError(field, f"cannot import {module_name!r} ({one_line(e)})") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(field, f"{module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(field, f"{path!r} is not callable")
    return obj
