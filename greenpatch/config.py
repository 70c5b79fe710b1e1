"""Settings read from the environment, with errors that name the setting.

``GREENPATCH``          ``1`` (default) or ``0``: ``0`` turns `patch_all` into
                        a logged no-op. Accepted: 1/0, true/false, yes/no, on/off.
``GREENPATCH_DISABLE``  comma-separated patch names that `patch_all` skips.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

__all__ = ["ConfigError", "disabled_patches", "enabled", "parse_bool"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A setting has a value greenpatch does not accept."""


def parse_bool(name: str, value: str) -> bool:
    """Parse a boolean setting; the error names ``name`` and what it accepts."""
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(
        f"{name}={value!r} is not a boolean; accepted values: 1, 0, true, false, yes, no, on, off"
    )


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether greenpatch should patch anything (``GREENPATCH``, default on)."""
    env = os.environ if environ is None else environ
    raw = env.get("GREENPATCH")
    return True if raw is None else parse_bool("GREENPATCH", raw)


def disabled_patches(known: Iterable[str], environ: Mapping[str, str] | None = None) -> set[str]:
    """Names listed in ``GREENPATCH_DISABLE``, each checked against ``known``."""
    env = os.environ if environ is None else environ
    raw = env.get("GREENPATCH_DISABLE", "")
    names = {n.strip() for n in raw.split(",") if n.strip()}
    known = sorted(known)
    unknown = sorted(names.difference(known))
    if unknown:
        raise ConfigError(
            f"GREENPATCH_DISABLE names unknown patch(es) {', '.join(unknown)}; "
            f"accepted names: {', '.join(known)}"
        )
    return names
