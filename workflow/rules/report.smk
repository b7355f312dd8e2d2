rule report:
    """Study tables (mean ± std, paired tests), figures and one self-contained HTML report."""
    input:
        metrics=all_metrics(),
        # not on the command line: the report opens these through the paths stored in the metrics JSON
        # (medrecon/report/study.py: montages and PSNR along z)
        references=eval_references(),
        recons=all_recons(),
    output:
        html=report(RESULTS / "report.html", caption="../report/report.rst", category="Report"),
        tables=directory(RESULTS / "tables"),
        figures=directory(RESULTS / "figures"),
    params:
        config=json.dumps(config, sort_keys=True),
    log:
        LOGS / "report.log",
    benchmark:
        BENCH / "report.tsv"
    conda:
        "../envs/medrecon.yaml"
    threads: 1
    resources:
        mem_mb=3000,
    shell:
        "medrecon report {output.html:q} {input.metrics:q} --config {params.config:q} > {log:q} 2>&1"
