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

# A subject whose input does not exist stops the workflow here, naming it: Snakemake would look at the path only
# if it decided to run that subject's ingest, and might instead call an old report up to date.
from snakemake.exceptions import WorkflowError
from medrecon.config import check_subject_inputs
from medrecon.errors import MedreconError

try:
    check_subject_inputs(config["subjects"])
except MedreconError as err:
    raise WorkflowError(f"{type(err).__name__}: {err}") from None


METHODS = sorted({m for ms in config["reconstruct"]["methods"].values() for m in ms})


wildcard_constraints:
    subject="|".join(map(re.escape, SUBJECTS)) or "NO_SUBJECTS",
    method="|".join(map(re.escape, METHODS)) or "NO_METHODS",
    prior="|".join(map(re.escape, config["train"])) or "NO_PRIORS",


def subject(wildcards):
    return SUBJECTS[wildcards.subject]


def section_json(*keys):
    """The config sections a rule needs, as JSON for `medrecon --config` (a param, so a change reruns it)."""
    return json.dumps({k: config[k] for k in keys}, sort_keys=True)


def subjects_with_role(role):
    return [sid for sid, s in SUBJECTS.items() if s.get("role", "eval") == role]


def methods_for(sid):
    return config["reconstruct"]["methods"][SUBJECTS[sid]["modality"]]


def all_metrics():
    return [RESULTS / sid / "metrics" / f"{m}.json" for sid in subjects_with_role("eval") for m in methods_for(sid)]


def all_recons():
    return [RESULTS / sid / "recon" / f"{m}.zarr" for sid in subjects_with_role("eval") for m in methods_for(sid)]


def eval_references():
    return [RESULTS / sid / "reference.zarr" for sid in subjects_with_role("eval")]


def final_outputs():
    return [RESULTS / "report.html"]


# ---- reconstruct: per-method config and priors, slab scatter ----------------------------------------------
SLAB_JOBS = int(config["reconstruct"]["slab"]["jobs"])     # the schema fills the default


def method_config(wildcards):
    """Only this method's parameters (and the shared reconstruct keys: seed, device) go to the job: editing one
    method's parameters, or adding a method, reruns nothing else. A warm start's classical method (``init:``,
    shared or under CT:/MR:) brings its own parameters, which make the start."""
    rc = config["reconstruct"]
    sub = {k: v for k, v in rc.items() if k not in ("params", "priors", "methods")}
    own = rc["params"].get(wildcards.method, {})
    inits = {own.get("init")} | {(own.get(m) or {}).get("init") for m in ("CT", "MR")}
    sub["params"] = {name: rc["params"][name] for name in inits if name in rc["params"]}
    sub["params"][wildcards.method] = own
    return json.dumps({"reconstruct": sub, "memory_mb": config.get("memory_mb")}, sort_keys=True)


def prior_input(wildcards):
    """The subject's own prior for this method (subjects[].priors), else the study's for its modality."""
    sub = SUBJECTS[wildcards.subject]
    path = (sub.get("priors") or {}).get(wildcards.method) or \
        config["reconstruct"]["priors"][sub["modality"]].get(wildcards.method)
    return [] if not path else [path] if isinstance(path, str) else list(path)


# ---- train: training volumes, autoencoder of a latent prior --------------------------------------------------
from medrecon.config import training_section


def training_volumes(wildcards):
    """Reference volumes (on the study grid) of the subjects with role 'train' and the prior's modality."""
    modality = config["train"][wildcards.prior]["modality"]
    vols = [RESULTS / sid / "reference.zarr" for sid in subjects_with_role("train")
            if SUBJECTS[sid]["modality"] == modality]
    if not vols:
        raise ValueError(f"train.{wildcards.prior}: no subjects with role 'train' and modality {modality}")
    return vols


def autoencoder_input(wildcards):
    """A latent prior (ReSample) trains on the autoencoder prior it names."""
    name = config["train"][wildcards.prior].get("autoencoder")
    return [RESULTS / "priors" / f"{name}.pt"] if name else []


def train_section(wildcards, input):
    """The prior's training config; a supervised prior (fbp_unet) also gets the study's measure.ct (its own
    measure keys over it), so it is trained for the acquisition it will reconstruct, and retrained when it changes."""
    section = training_section(config["train"][wildcards.prior], config)
    if input.autoencoder:
        section["autoencoder"] = str(input.autoencoder[0])
    return json.dumps({"train": {wildcards.prior: section}}, sort_keys=True)


# ---- GPUs: which jobs ask for one, how many run at once, and which GPU each gets ------------------------------
# A job that may use a GPU declares `resources: gpu=gpus_for(<its config device>)` and starts its command with
# `python -m medrecon.gpu_slots {resources.gpu} --`. Locally, Snakemake then runs at most as many GPU jobs at once
# as this machine has GPUs (the `gpu` limit below; `--resources gpu=N` overrides it) and the wrapper gives each
# running job its own GPU through CUDA_VISIBLE_DEVICES (medrecon/gpu_slots.py). On SLURM the profile's
# set-resources ask for the GPUs and SLURM sets CUDA_VISIBLE_DEVICES; the wrapper then leaves it alone.
from medrecon.gpu_slots import visible_gpus

N_GPUS = len(visible_gpus())


def gpus_for(device):
    """GPUs a job on config device `device` (auto | cpu | cuda) uses: 1 for 'cuda', and for 'auto' where this
    machine has a GPU; else 0 (so CPU jobs are never held back by the GPU limit)."""
    return 1 if device == "cuda" or (device == "auto" and N_GPUS > 0) else 0


if N_GPUS > 0 and "gpu" not in workflow.global_resources:
    # On a GPU machine: one GPU job per GPU unless the user said otherwise with --resources gpu=N (the SLURM
    # profile does, cluster-wide, so a submit host's own GPUs never cap a cluster run). `global_resources` (what
    # --resources gave) and `register_resource` behave the same across Snakemake 9.x; the internal "_nodes"
    # entry read here before changed type within 9.x (9.15 died on it).
    workflow.register_resource("gpu", N_GPUS)
