"""The one check of an options mapping against its defaults: method parameters, training options.

The study schema (``schema.yaml``) leaves some sections open because their keys belong to code that can be
extended: ``reconstruct.params.<method>`` (each method's registered defaults) and ``train.<name>`` (each prior
kind's options). Those are checked here, all the same way: the given keys over a copy of the defaults, and a
key that is not among the defaults (a typo) is a :class:`~medrecon.errors.ConfigError` that names it, what it
was given for and every allowed key.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from medrecon.errors import ConfigError


def fill_defaults(given: Mapping[str, Any] | None, defaults: Mapping[str, Any], *, what: str, where: str,
                  context: str = "") -> dict[str, Any]:
    """``given`` over a deep copy of ``defaults``; unknown keys are a ConfigError.

    ``what`` names one key ("parameter", "training option"), ``context`` follows the key list in the message
    (" for method 'dps'"), ``where`` is the config section the fix points at (``reconstruct.params.dps``).
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        allowed = ", ".join(sorted(defaults)) or "none"
        raise ConfigError(f"unknown {what}(s) {unknown}{context}; allowed: {allowed}",
                          fix=f"correct {where} (a typo? the allowed keys are listed above)")
    return {**copy.deepcopy(dict(defaults)), **copy.deepcopy(given)}
