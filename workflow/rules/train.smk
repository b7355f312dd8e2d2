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
    section = dict(config["train"][wildcards.prior])
    if input.autoencoder:
        section["autoencoder"] = str(input.autoencoder[0])
    return json.dumps({"train": {wildcards.prior: section}}, sort_keys=True)


rule train:
    """Train a diffusion prior on the study's training volumes (resumes from its last checkpoint)."""
    input:
        volumes=training_volumes,
        autoencoder=autoencoder_input,
    output:
        RESULTS / "priors" / "{prior}.pt",
    params:
        config=train_section,
    log:
        LOGS / "train_{prior}.log",
    benchmark:
        BENCH / "train_{prior}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        gpu=lambda wildcards: gpus_for(config["train"][wildcards.prior].get("device", "auto")),
    shell:
        GPU_SLOT + " medrecon train {output:q} {input.volumes:q} --name {wildcards.prior} --config {params.config:q} > {log:q} 2>&1"
