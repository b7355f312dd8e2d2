# medrecon: DICOM/NIfTI studies -> zarr volumes -> simulated measurements -> reconstructions -> metrics -> report.
# Rules are thin: each calls one `medrecon <verb>`; the science lives in the medrecon package.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


validate(config, "medrecon/config/schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/resample.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/reconstruct.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
