"""Settings read from the environment, with errors that name the setting.

``GREENPATCH``          ``1`` (default) or ``0``: ``0`` turns `patch_all` into
                        a logged no-op. Accepted: 1/0, true/false, yes/no, on/off.
``GREENPATCH_DISABLE``  comma-separated patch names that `patch_all` skips.
``GREENPATCH_BLOCKING_THRESHOLD``  seconds an IOLoop may be blocked before
                        `greenpatch.monitor` warns (default 0.1; 0 disables).
``GREENPATCH_STATS_INTERVAL``  seconds between pool statistics log lines of
                        `serve()` / ``runserver`` (default: unset, no lines).
``GREENPATCH_TURN_BUDGET``  seconds of each turn of an IOLoop during which its
                        workers read database replies that are already there
                        without letting the other workers run first (default
                        0: every reply waits for the next turn).
``GREENPATCH_GC``       ``tuned`` (default) or ``python``: how `serve()` sets up
                        Python's cyclic garbage collector once the application
                        is loaded (see `greenpatch.gc_tuning`); ``python``
                        leaves it as the interpreter and the application set it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping

__all__ = [
    "ConfigError",
    "blocking_threshold",
    "disabled_patches",
    "enabled",
    "gc_policy",
    "parse_gc_policy",
    "parse_bool",
    "parse_seconds",
    "stats_interval",
    "turn_budget",
]

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


# -- greenpatch.monitor settings ------------------------------------------------

#: Default of ``GREENPATCH_BLOCKING_THRESHOLD``, in seconds.
DEFAULT_BLOCKING_THRESHOLD = 0.1


def parse_seconds(name: str, value: str, zero_means: str) -> float:
    """Parse a number of seconds >= 0; the error names ``name`` and what it accepts."""
    try:
        seconds = float(value.strip())
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(
            f"{name}={value!r} is not accepted; accepted values: a number of seconds >= 0 "
            f"such as 0.5 (0 {zero_means})"
        )
    return seconds


def _seconds_setting(name: str, environ: Mapping[str, str] | None, default: float, zero_means: str) -> float:
    # ``name`` from ``environ`` (default: os.environ); ``default`` when unset or blank.
    raw = (os.environ if environ is None else environ).get(name, "")
    if not raw.strip():
        return default
    return parse_seconds(name, raw, zero_means)


def blocking_threshold(environ: Mapping[str, str] | None = None) -> float:
    """``GREENPATCH_BLOCKING_THRESHOLD`` in seconds (default 0.1); 0 means disabled."""
    return _seconds_setting(
        "GREENPATCH_BLOCKING_THRESHOLD", environ, DEFAULT_BLOCKING_THRESHOLD, "disables the blocking detector"
    )


def stats_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """``GREENPATCH_STATS_INTERVAL`` in seconds, or None when unset or 0 (no stats lines)."""
    return _seconds_setting("GREENPATCH_STATS_INTERVAL", environ, 0.0, "logs no statistics") or None


#: Default of ``GREENPATCH_TURN_BUDGET``, in seconds. Reading first pays
#: only where replies are often there at once: a database server on the
#: same cores as two or more server processes (README, Performance).
DEFAULT_TURN_BUDGET = 0.0


def turn_budget(environ: Mapping[str, str] | None = None) -> float:
    """``GREENPATCH_TURN_BUDGET`` in seconds (default 0: every reply waits for a turn)."""
    zero_means = "waits for a turn of the loop before every reply"
    return _seconds_setting("GREENPATCH_TURN_BUDGET", environ, DEFAULT_TURN_BUDGET, zero_means)


# -- greenpatch.gc_tuning setting ---------------------------------------------------

#: Accepted values of ``GREENPATCH_GC``; the first is the default.
GC_POLICIES = ("tuned", "python")


def parse_gc_policy(name: str, value: str) -> str:
    """``value`` as one of `GC_POLICIES` (blank: the default); the error names ``name``."""
    policy = value.strip().lower() or GC_POLICIES[0]
    if policy not in GC_POLICIES:
        raise ConfigError(f"{name}={value!r} is not accepted; accepted values: {', '.join(GC_POLICIES)}")
    return policy


def gc_policy(environ: Mapping[str, str] | None = None) -> str:
    """``GREENPATCH_GC``: ``tuned`` (default, also when blank) or ``python``."""
    raw = (os.environ if environ is None else environ).get("GREENPATCH_GC", "")
    return parse_gc_policy("GREENPATCH_GC", raw)
