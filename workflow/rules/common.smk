# Helpers shared by the rules: subjects, paths, and the config sections each rule passes to the CLI.
import json
import re
from pathlib import Path

STUDY = config["study"]
RESULTS = Path(config["results"]) / STUDY
LOGS = RESULTS / "logs"
BENCH = RESULTS / "benchmarks"
SUBJECTS = {s["id"]: s for s in config["subjects"]}
if len(SUBJECTS) != len(config["subjects"]):
    raise ValueError(f"config: subject ids must be unique in study {STUDY!r}")


METHODS = sorted({m for ms in config["reconstruct"]["methods"].values() for m in ms})


wildcard_constraints:
    subject="|".join(map(re.escape, SUBJECTS)) or "NO_SUBJECTS",
    method="|".join(map(re.escape, METHODS)) or "NO_METHODS",
    prior="|".join(map(re.escape, config["train"])) or "NO_PRIORS",


def subject(wildcards):
    return SUBJECTS[wildcards.subject]


def section_json(*keys):
    """The config sections a rule needs, as JSON for `medrecon --config` (params: a change reruns the rule)."""
    return json.dumps({k: config[k] for k in keys}, sort_keys=True)


def subjects_with_role(role):
    return [sid for sid, s in SUBJECTS.items() if s.get("role", "eval") == role]


def methods_for(sid):
    return config["reconstruct"]["methods"][SUBJECTS[sid]["modality"]]


def all_metrics():
    return [RESULTS / sid / "metrics" / f"{m}.json" for sid in subjects_with_role("eval") for m in methods_for(sid)]


def final_outputs():
    return [RESULTS / "report.html"]
