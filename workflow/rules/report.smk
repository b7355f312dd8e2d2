rule report:
    """Study tables (mean ± std, paired tests), figures and one self-contained HTML report."""
    input:
        metrics=all_metrics(),
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
    threads: 1
    resources:
        mem_mb=3000,
    shell:
        "medrecon report {output.html:q} {input.metrics:q} --config {params.config:q} > {log:q} 2>&1"
