def training_volumes(wildcards):
    """Ingested volumes of the subjects with role 'train' and the prior's modality."""
    modality = config["train"][wildcards.prior]["modality"]
    vols = [RESULTS / sid / "volume.zarr" for sid in subjects_with_role("train")
            if SUBJECTS[sid]["modality"] == modality]
    if not vols:
        raise ValueError(f"train.{wildcards.prior}: no subjects with role 'train' and modality {modality}")
    return vols


rule train:
    """Train a diffusion prior on the study's training volumes (resumes from its last checkpoint)."""
    input:
        training_volumes,
    output:
        RESULTS / "priors" / "{prior}.pt",
    params:
        config=lambda wc: json.dumps({"train": {wc.prior: config["train"][wc.prior]}}, sort_keys=True),
    log:
        LOGS / "train_{prior}.log",
    benchmark:
        BENCH / "train_{prior}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
    shell:
        "medrecon train {output:q} {input:q} --name {wildcards.prior} --config {params.config:q} > {log:q} 2>&1"
