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
    conda:
        "../envs/medrecon.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        gpu=lambda wildcards: gpus_for(config["train"][wildcards.prior].get("device", "auto")),
    shell:
        "python -m medrecon.gpu_slots {resources.gpu} -- "
        "medrecon train {output:q} {input.volumes:q} --name {wildcards.prior} "
        "--config {params.config:q} > {log:q} 2>&1"
