"""Study configuration: one JSON schema (``schema.yaml`` beside this file) with the defaults.

The Snakefile validates the whole config with ``snakemake.utils.validate`` against the same file; the CLI
validates what a rule hands it (a subset of top-level sections, as inline JSON or a YAML file) so each step
is also usable, and checked, without Snakemake. Unknown keys and wrong types are errors naming the key.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from medrecon.errors import ConfigError

SCHEMA_PATH = Path(__file__).with_name("schema.yaml")


# A subject input that is generated, not read: ``phantom:<kind>[,key=value...]`` (see medrecon.io.ingest).
PHANTOM_PREFIX = "phantom:"


def schema() -> dict[str, Any]:
    with open(SCHEMA_PATH) as f:
        return yaml.safe_load(f)


def _with_defaults(validator_class: type) -> type:
    """jsonschema validator that also fills ``default`` values (the recipe from the jsonschema docs)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, sch):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, sch)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def validate(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate ``config`` (a copy) against the schema, fill defaults, and return it.

    Raises :class:`ConfigError` naming the offending key path, the problem and the fix.
    """
    cfg = copy.deepcopy(config)
    errors = sorted(_Validator(schema()).iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ConfigError(f"Invalid configuration in {source} at '{where}': {err.message}.",
                          fix="correct that key (see medrecon/config/schema.yaml for allowed keys, types "
                              "and defaults).")
    return cfg


def load(spec: str | Path | None) -> dict[str, Any]:
    """Load a config from a YAML/JSON file path or an inline JSON object string; validate; fill defaults."""
    if spec is None:
        return validate({}, "defaults")
    text = str(spec)
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--config is not valid JSON: {err}.", fix="pass a YAML file or a JSON object.") from err
        source = "inline --config"
    else:
        path = Path(text)
        if not path.exists():
            raise ConfigError(f"Config file {path} does not exist.", path=path, fix="check the path.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"Config file {path} is not valid YAML: {err}", path=path,
                              fix="fix the YAML syntax.") from err
        source = str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"Config {source} must be a mapping of keys to values.", fix="see config/config.yaml.")
    return validate(data, source)


def check_subject_inputs(subjects: list[dict[str, Any]], base: str | Path | None = None) -> None:
    """Refuse subjects whose ``input`` path does not exist, before any job is planned.

    Why at load time: Snakemake only looks at a missing input when it decides to run that job, so a new
    subject with a mistyped path in a study that already has a report can leave the old report "up to date"
    and the user with stale results. Relative paths are taken from ``base`` (default: the working directory,
    which Snakemake sets to the workflow directory). Generated inputs (``phantom:...``) are not paths.
    """
    root = Path.cwd() if base is None else Path(base)
    missing = []
    for subject in subjects:
        src = str(subject["input"])
        if src.startswith(PHANTOM_PREFIX) or (root / src).exists():
            continue
        missing.append((str(subject["id"]), src, _close_match(root, src)))
    if not missing:
        return
    where = f"relative paths are taken from {root}"
    hints = ", ".join(f"{hint} for {sid!r}" for sid, _, hint in missing if hint)
    hint = f" (did you mean {hints}?)" if hints else ""
    if len(missing) == 1:
        sid, src, _ = missing[0]
        raise ConfigError(f"Subject {sid!r}: input {src} does not exist ({where}).",
                          fix=f"correct the subject's `input` in the config{hint}, or remove the subject.")
    listing = "; ".join(f"{sid!r}: {src}" for sid, src, _ in missing)
    raise ConfigError(f"{len(missing)} subjects have an input that does not exist ({where}): {listing}.",
                      fix=f"correct these subjects' `input` in the config{hint}, or remove them.")


def _close_match(root: Path, src: str) -> str | None:
    """The sibling of a mistyped path that is most like it (e.g. ct_chset_s1 -> ct_chest_s1), if any."""
    path = Path(src)
    parent = root / path.parent
    if not parent.is_dir():
        return None
    names = [p.name for p in parent.iterdir()]
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.8)
    return str(path.parent / close[0]) if close else None


def training_section(section: dict[str, Any], study: dict[str, Any]) -> dict[str, Any]:
    """The training config ``train.<name>`` with what its kind takes from the rest of the study: a ``supervised``
    prior (FBP-UNet) is trained for the study's CT acquisition, so its ``measure`` is the study's
    ``measure.ct`` with the section's own ``measure`` keys over it. Other kinds are returned as they are.
    (Used by ``medrecon train`` and the workflow's train rule, whose params then change with measure.ct.)"""
    out = dict(section or {})
    if out.get("kind") == "supervised":
        study_ct = ((study or {}).get("measure") or {}).get("ct") or {}
        out["measure"] = {**study_ct, **(out.get("measure") or {})}
    return out
