rule ingest:
    """Read one subject's DICOM series / NIfTI file into a chunked zarr volume with geometry and provenance."""
    input:
        # generated phantoms ("phantom:...") have no input file
        lambda wc: [] if subject(wc)["input"].startswith("phantom:") else subject(wc)["input"],
    output:
        directory(RESULTS / "{subject}" / "volume.zarr"),
    params:
        src=lambda wc: subject(wc)["input"],
        config=section_json("ingest", "memory_mb"),
        modality=lambda wc: f"--modality {subject(wc)['modality']}" if subject(wc).get("modality") else "",
        series=lambda wc: f"--series {subject(wc)['series']}" if subject(wc).get("series") else "",
        timepoint=lambda wc: f"--timepoint {subject(wc)['timepoint']}" if subject(wc).get("timepoint") is not None else "",
    log:
        LOGS / "{subject}" / "ingest.log",
    benchmark:
        BENCH / "{subject}" / "ingest.tsv"
    conda:
        "../envs/medrecon.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "medrecon ingest {params.src:q} {output:q} --config {params.config:q} {params.modality} {params.series} "
        "{params.timepoint} > {log:q} 2>&1"
