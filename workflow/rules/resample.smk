rule resample:
    """Put the ingested volume on the study's reconstruction grid (config 'grid'): the reference volume."""
    input:
        RESULTS / "{subject}" / "volume.zarr",
    output:
        directory(RESULTS / "{subject}" / "reference.zarr"),
    params:
        config=section_json("grid"),
        slices=lambda wc: "--slices {} {}".format(*subject(wc)["slices"]) if subject(wc).get("slices") else "",
    log:
        LOGS / "{subject}" / "resample.log",
    benchmark:
        BENCH / "{subject}" / "resample.tsv"
    conda:
        "../envs/medrecon.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "medrecon resample {input:q} {output:q} --config {params.config:q} {params.slices} > {log:q} 2>&1"
