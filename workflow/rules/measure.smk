rule measure:
    """Simulate the measurement (CT sinogram with ASTRA, multi-coil k-space with SigPy) with noise."""
    input:
        RESULTS / "{subject}" / "reference.zarr",
    output:
        directory(RESULTS / "{subject}" / "measurement.zarr"),
    params:
        config=section_json("measure"),
    log:
        LOGS / "{subject}" / "measure.log",
    benchmark:
        BENCH / "{subject}" / "measure.tsv"
    conda:
        "../envs/medrecon.yaml"
    threads: 1
    resources:
        mem_mb=4000,
    shell:
        "medrecon measure {input:q} {output:q} --config {params.config:q} > {log:q} 2>&1"
