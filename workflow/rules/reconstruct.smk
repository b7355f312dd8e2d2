def method_config(wildcards):
    """Only this method's parameters (and the shared reconstruct keys: seed, device) go to the job: editing one
    method's parameters, or adding a method, reruns nothing else."""
    rc = config["reconstruct"]
    sub = {k: v for k, v in rc.items() if k not in ("params", "priors", "methods")}
    sub["params"] = {wildcards.method: rc["params"].get(wildcards.method, {})}
    return json.dumps({"reconstruct": sub}, sort_keys=True)


def prior_input(wildcards):
    path = config["reconstruct"]["priors"][SUBJECTS[wildcards.subject]["modality"]].get(wildcards.method)
    return [] if not path else [path] if isinstance(path, str) else list(path)


rule reconstruct:
    """Reconstruct one subject with one method (classical or diffusion) into a volume in HU / magnitude."""
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
    threads: 1
    resources:
        mem_mb=8000,
    shell:
        "medrecon reconstruct {input.measurement:q} {output:q} --method {wildcards.method} "
        "--config {params.config:q} {params.prior} > {log:q} 2>&1"
