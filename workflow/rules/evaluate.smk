rule evaluate:
    """PSNR/SSIM (3D and per plane), NRMSE, slice consistency, data residual, runtime/memory, coverage → JSON."""
    input:
        reference=RESULTS / "{subject}" / "reference.zarr",
        recon=RESULTS / "{subject}" / "recon" / "{method}.zarr",
        # not on the command line: evaluate opens it through the path the reconstruction records, to check
        # that the reference is the volume that was measured (medrecon/evaluate.py, check_same_volume)
        measurement=RESULTS / "{subject}" / "measurement.zarr",
    output:
        RESULTS / "{subject}" / "metrics" / "{method}.json",
    params:
        config=section_json("evaluate"),
    log:
        LOGS / "{subject}" / "evaluate_{method}.log",
    benchmark:
        BENCH / "{subject}" / "evaluate_{method}.tsv"
    conda:
        "../envs/medrecon.yaml"
    threads: 1
    resources:
        mem_mb=3000,
    shell:
        "medrecon evaluate {input.reference:q} {input.recon:q} {output:q} --subject {wildcards.subject} "
        "--method {wildcards.method} --config {params.config:q} > {log:q} 2>&1"
