# Reconstruction: one job per subject and method, or (reconstruct.slab.jobs > 1) scattered over slab jobs and
# gathered. Helpers (method_config, prior_input, SLAB_JOBS) are in common.smk.
if SLAB_JOBS == 1:

    rule reconstruct:
        """Reconstruct one subject with one method (classical or diffusion) into a volume in HU / magnitude.
        Per-slice geometries go slab by slab inside the job (reconstruct.slab), resuming from finished slabs."""
        input:
            measurement=RESULTS / "{subject}" / "measurement.zarr",
            prior=prior_input,
        output:
            directory(RESULTS / "{subject}" / "recon" / "{method}.zarr"),
        params:
            config=method_config,
            prior=lambda wc, input: "--prior " + " ".join(map(str, input.prior)) if input.prior else "",
        log:
            LOGS / "{subject}" / "reconstruct_{method}.log",
        benchmark:
            BENCH / "{subject}" / "reconstruct_{method}.tsv"
        conda:
            "../envs/medrecon.yaml"
        threads: 1
        resources:
            mem_mb=8000,
            gpu=gpus_for(config["reconstruct"]["device"]),
        shell:
            "python -m medrecon.gpu_slots {resources.gpu} -- "
            "medrecon reconstruct {input.measurement:q} {output:q} --method {wildcards.method} "
            "--config {params.config:q} {params.prior} > {log:q} 2>&1"

else:

    rule reconstruct_part:
        """Scatter: job {part} of reconstruct.slab.jobs over the volume's slab plan (a folder of slab volumes;
        empty when the plan has fewer slabs than jobs, or for geometries that cannot be cut, except part 0)."""
        input:
            measurement=RESULTS / "{subject}" / "measurement.zarr",
            prior=prior_input,
        output:
            temp(directory(RESULTS / "{subject}" / "recon" / "{method}.parts" / "{part}")),
        params:
            config=method_config,
            prior=lambda wc, input: "--prior " + " ".join(map(str, input.prior)) if input.prior else "",
            jobs=SLAB_JOBS,
        wildcard_constraints:
            part=r"\d+",
        log:
            LOGS / "{subject}" / "reconstruct_{method}_part{part}.log",
        benchmark:
            BENCH / "{subject}" / "reconstruct_{method}_part{part}.tsv"
        conda:
            "../envs/medrecon.yaml"
        threads: 1
        resources:
            mem_mb=8000,
            gpu=gpus_for(config["reconstruct"]["device"]),
        shell:
            "python -m medrecon.gpu_slots {resources.gpu} -- "
            "medrecon reconstruct {input.measurement:q} {output:q} --method {wildcards.method} "
            "--part {wildcards.part}/{params.jobs} --config {params.config:q} {params.prior} > {log:q} 2>&1"

    rule gather:
        """Gather: blend the slabs of all parts into the reconstruction volume (raised-cosine weights over
        the halos); the part folders are temporary."""
        input:
            lambda wc: [RESULTS / wc.subject / "recon" / f"{wc.method}.parts" / str(i) for i in range(SLAB_JOBS)],
        output:
            directory(RESULTS / "{subject}" / "recon" / "{method}.zarr"),
        log:
            LOGS / "{subject}" / "gather_{method}.log",
        conda:
            "../envs/medrecon.yaml"
        threads: 1
        resources:
            mem_mb=4000,
        shell:
            "medrecon gather {input:q} {output:q} > {log:q} 2>&1"
