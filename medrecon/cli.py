"""The medrecon command: one verb per workflow rule, so every step runs (and is tested) without Snakemake.

Errors caused by input or configuration print one line (``medrecon: error: ...``) and exit with status 2;
anything else is a bug and keeps its traceback. Help texts are plain text (no reStructuredText markup).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from medrecon import __version__
from medrecon.errors import MedreconError

log = logging.getLogger("medrecon")

_VERBS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def verb(name: str, help: str):
    """Register a CLI verb: the decorated function adds arguments, ``fn.run`` executes."""

    def deco(add_args: Callable[[argparse.ArgumentParser], None]):
        def with_run(run: Callable[[argparse.Namespace], int]):
            _VERBS[name] = (add_args, run)
            run.help = help  # type: ignore[attr-defined]
            return run

        add_args.run = with_run  # type: ignore[attr-defined]
        return add_args

    return deco


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="study config: YAML/JSON file or inline JSON object (validated; defaults filled)")


# ---------------------------------------------------------------------------------------------- ingest
@verb("ingest", "read a DICOM series / NIfTI file / medrecon zarr into chunked zarr volume(s)")
def _ingest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="DICOM folder or file, NIfTI file, or medrecon .zarr volume")
    p.add_argument("out", help="output .zarr (exactly one volume) or a directory (one store per series)")
    _config_arg(p)
    p.add_argument("--modality", choices=["CT", "MR"], help="modality (needed for NIfTI)")
    p.add_argument("--series", help="SeriesInstanceUID or SeriesNumber to select from a folder of several")
    p.add_argument("--timepoint", type=int, help="time point of a 4D series (with on_4d: split)")
    p.add_argument("--on-tilt", choices=["error", "resample"], help="override ingest.on_tilt")
    p.add_argument("--on-irregular-spacing", choices=["error", "resample"],
                   help="override ingest.on_irregular_spacing")
    p.add_argument("--on-4d", choices=["error", "split"], help="override ingest.on_4d")


@_ingest_args.run
def _ingest(a: argparse.Namespace) -> int:
    from medrecon import config as cfgmod
    from medrecon.io.ingest import ingest

    cfg = cfgmod.load(a.config)
    for key in ("on_tilt", "on_irregular_spacing", "on_4d"):
        if getattr(a, key) is not None:
            cfg["ingest"][key] = getattr(a, key)
    paths = ingest(a.src, a.out, cfg, modality=a.modality, series=a.series, timepoint=a.timepoint)
    for p in paths:
        print(p)
    return 0


# ------------------------------------------------------------------------------------------------ info
@verb("info", "print the metadata of a medrecon zarr store (volume or measurement)")
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")


@_info_args.run
def _info(a: argparse.Namespace) -> int:
    from medrecon.measurement import FORMAT as MEASUREMENT_FORMAT
    from medrecon.measurement import Measurement
    from medrecon.volume import Volume

    path = Path(a.path)
    if (path / "zarr.json").exists() and MEASUREMENT_FORMAT in (path / "zarr.json").read_text():
        m = Measurement.open(path)
        info = {"path": str(path), "y_shape": list(m.y.shape), "y_dtype": str(m.y.dtype),
                "operator_arrays": {k: list(v.shape) for k, v in m.group["operator"].arrays()}, **m.meta}
    else:
        info = Volume.open(path).info()
    print(json.dumps(info, indent=2, default=str))
    return 0


# --------------------------------------------------------------------------------------------- phantom
@verb("phantom", "generate a seeded synthetic volume (zarr, or a DICOM series with --dicom)")
def _phantom_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", help="phantom kind, e.g. ct_chest or mr_brain")
    p.add_argument("out", help="output .zarr volume, or a folder for --dicom")
    p.add_argument("--shape", type=int, nargs=3, default=(32, 128, 128), metavar=("Z", "Y", "X"))
    p.add_argument("--spacing", type=float, nargs=3, default=(2.0, 1.5, 1.5), metavar=("DZ", "DY", "DX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dicom", action="store_true", help="write a DICOM series instead of zarr")


@_phantom_args.run
def _phantom(a: argparse.Namespace) -> int:
    from medrecon.io.phantoms import make_phantom, write_phantom_volume

    if not a.dicom:
        write_phantom_volume(a.kind, a.out, tuple(a.shape), tuple(a.spacing), a.seed)
        print(a.out)
        return 0
    from medrecon.io.dicom_writer import write_dicom_series

    data, geometry, meta = make_phantom(a.kind, tuple(a.shape), tuple(a.spacing), a.seed)
    write_dicom_series(data, geometry, a.out, modality=meta["modality"],
                       series_description=f"medrecon phantom {a.kind} seed {a.seed}", seed=a.seed)
    print(a.out)
    return 0


# ----------------------------------------------------------------------------------------------- train
@verb("train", "train a diffusion prior (config train.<name>) on ingested training volumes")
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output checkpoint (.pt); resume state and loss log are written beside it")
    p.add_argument("volumes", nargs="+", help="training volumes (.zarr)")
    p.add_argument("--name", required=True, help="prior name: the key under train: in the config")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if a resume file exists")
    _config_arg(p)


@_train_args.run
def _train(a: argparse.Namespace) -> int:
    from medrecon import config as cfgmod
    from medrecon.diffusion.kinds import train_prior
    from medrecon.errors import ConfigError

    cfg = cfgmod.load(a.config)
    if a.name not in cfg["train"]:
        raise ConfigError(f"No prior named {a.name!r} under 'train' in the config.",
                          fix=f"add train.{a.name} (known: {sorted(cfg['train'])}).")
    section = cfgmod.training_section(cfg["train"][a.name], cfg)
    print(train_prior(section, [Path(v) for v in a.volumes], Path(a.out), resume=not a.no_resume))
    return 0


# -------------------------------------------------------------------------------------------- resample
@verb("resample", "put a volume on the study's reconstruction grid (config 'grid'): the reference volume")
def _resample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("volume", help="input medrecon volume (.zarr), e.g. from `medrecon ingest`")
    p.add_argument("out", help="output volume (.zarr) on the grid")
    p.add_argument("--slices", type=int, nargs=2, metavar=("FIRST", "STOP"),
                   help="only slices FIRST..STOP-1 of the volume (a slab of interest)")
    _config_arg(p)


@_resample_args.run
def _resample(a: argparse.Namespace) -> int:
    from medrecon import config as cfgmod
    from medrecon.grid import resample

    print(resample(a.volume, a.out, cfgmod.load(a.config)["grid"], slices=a.slices).path)
    return 0


# --------------------------------------------------------------------------------------------- measure
@verb("measure", "simulate a CT sinogram (ASTRA) or multi-coil k-space (SigPy) with noise from a volume")
def _measure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("volume", help="input medrecon volume (.zarr)")
    p.add_argument("out", help="output measurement store (.zarr)")
    _config_arg(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


@_measure_args.run
def _measure(a: argparse.Namespace) -> int:
    from medrecon import config as cfgmod
    from medrecon.device import pick_device
    from medrecon.measure import measure

    print(measure(a.volume, a.out, cfgmod.load(a.config), device=pick_device(a.device, "--device")))
    return 0


# ----------------------------------------------------------------------------------------- reconstruct
@verb("reconstruct", "reconstruct a measurement with one registered method (classical or diffusion)")
def _reconstruct_args(p: argparse.ArgumentParser) -> None:
    p.usage = ("medrecon reconstruct MEASUREMENT OUT --method NAME [--prior CKPT [CKPT ...]] [--part I/N] "
               "[--config CONFIG]")
    # Optional in argparse's eyes only: a --prior list given before them takes them (nargs="+" is greedy), and
    # _positionals_after_prior gives them back.
    p.add_argument("measurement", nargs="?", metavar="MEASUREMENT", help="measurement store (.zarr)")
    p.add_argument("out", nargs="?", metavar="OUT",
                   help="output volume (.zarr); posterior std (several samples) goes to OUT/std")
    p.add_argument("--method", required=True, metavar="NAME",
                   help="registered method (`medrecon methods` lists them: fbp, sirt, tv, cgls, sense, dds, dps, ...)")
    p.add_argument("--prior", nargs="+", action="extend", metavar="CKPT",
                   help="prior checkpoint(s) for diffusion methods (ReSample: autoencoder then latent prior); "
                        "may come before or after the positional arguments, or be repeated")
    p.add_argument("--part", type=_part, help="I/N: reconstruct only job I (0-based) of N over the slab plan "
                   "(reconstruct.slab); OUT is then a folder of slab volumes for `medrecon gather`")
    _config_arg(p)
    p.set_defaults(_after_parse=lambda a: _positionals_after_prior(a, p))


def _positionals_after_prior(a: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """``--prior A B MEAS OUT``: argparse's greedy ``nargs="+"`` puts the positionals in the prior list; the
    positionals that are missing are the last items of that list, in order (so after a --prior list placed
    before them, the positionals come next, before any other option)."""
    missing = [name for name in ("measurement", "out") if getattr(a, name) is None]
    if not missing:
        return
    priors = list(a.prior or [])
    if len(priors) <= len(missing):
        p.error(f"the following arguments are required: {', '.join(m.upper() for m in missing)}")
    taken = priors[len(priors) - len(missing):]
    a.prior = priors[: len(priors) - len(missing)]
    for name, value in zip(missing, taken, strict=True):
        setattr(a, name, value)


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part must look like I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--part {text}: need 0 <= I < N")
    return i, n


@_reconstruct_args.run
def _reconstruct(a: argparse.Namespace) -> int:
    from medrecon import config as cfgmod
    from medrecon.recon.registry import get_method
    from medrecon.reconstruct import reconstruct

    get_method(a.method)      # an unknown name fails first, listing the registered methods

    out = reconstruct(a.measurement, a.out, a.method, cfgmod.load(a.config), prior_path=a.prior, part=a.part)
    print(getattr(out, "path", out))
    return 0


# ---------------------------------------------------------------------------------------------- gather
@verb("gather", "blend the slab volumes of `reconstruct --part` jobs into one reconstruction volume")
def _gather_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("parts", nargs="+", help="folders written by `medrecon reconstruct --part I/N`")
    p.add_argument("out", help="output volume (.zarr)")


@_gather_args.run
def _gather(a: argparse.Namespace) -> int:
    from medrecon.reconstruct import gather_parts

    print(gather_parts(a.parts, a.out).path)
    return 0


# -------------------------------------------------------------------------------------------- evaluate
@verb("evaluate", "metrics of a reconstruction against its reference volume, as JSON")
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", help="reference volume (.zarr)")
    p.add_argument("recon", help="reconstruction volume (.zarr)")
    p.add_argument("out", help="output JSON")
    p.add_argument("--subject", required=True)
    p.add_argument("--method", required=True)
    _config_arg(p)


@_evaluate_args.run
def _evaluate(a: argparse.Namespace) -> int:
    from medrecon import config as cfgmod
    from medrecon.evaluate import evaluate

    doc = evaluate(a.reference, a.recon, a.out, cfgmod.load(a.config), a.subject, a.method)
    print(json.dumps(doc["metrics"], indent=1))
    return 0


# ---------------------------------------------------------------------------------------------- report
@verb("report", "study tables, figures and one self-contained HTML report from evaluate's JSON files")
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output HTML; tables/ and figures/ are written beside it")
    p.add_argument("metrics", nargs="+", help="metrics JSON files from `medrecon evaluate`")
    _config_arg(p)


@_report_args.run
def _report(a: argparse.Namespace) -> int:
    from medrecon import config as cfgmod
    from medrecon.report.study import build_study_report

    print(build_study_report(a.metrics, a.out, cfgmod.load(a.config)))
    return 0


# --------------------------------------------------------------------------------------------- methods
@verb("methods", "list every registered reconstruction method: modalities, prior kind, parameters, paper")
def _methods_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON (one object per method) instead of a table")


def method_rows() -> list[dict]:
    """One dict per registered method (what ``medrecon methods --json`` prints), classical methods first."""
    from medrecon.recon.registry import load_all

    rows = []
    for spec in sorted(load_all().values(), key=lambda s: (s.prior is not None, s.modalities, s.name)):
        loader = spec.loader if spec.loader is None or isinstance(spec.loader, str) \
            else f"{spec.loader.__module__}:{spec.loader.__qualname__}"
        rows.append({"name": spec.name, "modalities": list(spec.modalities), "prior": spec.prior,
                     "loader": loader, "init": spec.init, "parameters": spec.defaults, "paper": spec.paper,
                     "memory_copies": spec.memory_copies, "module": spec.module})
    return rows


def format_methods(rows: list[dict], width: int = 110) -> str:
    """The plain-text table of :func:`method_rows`: one aligned line per method, its parameters
    (``name=default``) and paper indented below it."""
    head = ("METHOD", "MODALITY", "PRIOR", "INIT")
    cells = [(r["name"], "/".join(r["modalities"]), r["prior"] or "-", r["init"] or "-") for r in rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*head).rstrip()]
    for r, c in zip(rows, cells, strict=True):
        out.append(line.format(*c).rstrip())
        params = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(r["parameters"].items())) or "(none)"
        out += textwrap.wrap(params, width, initial_indent="    parameters: ", subsequent_indent=" " * 16,
                             break_on_hyphens=False)
        out += textwrap.wrap(r["paper"], width, initial_indent="    paper: ", subsequent_indent=" " * 11)
    return "\n".join(out)


@_methods_args.run
def _methods(a: argparse.Namespace) -> int:
    rows = method_rows()
    print(json.dumps(rows, indent=1) if a.json else format_methods(rows))
    return 0


# ------------------------------------------------------------------------------------------------ main
def plain(text: str) -> str:
    """Help text without reStructuredText markup: ``code`` and :role:`x` lose their markup, a command in
    single backticks (`medrecon gather`) is quoted ('medrecon gather')."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return re.sub(r"`([^`]+)`", r"'\1'", text)


# Third-party loggers that stay at WARNING whatever -v says (font lists, codec registrations).
QUIET_LOGGERS = ("matplotlib", "PIL", "numcodecs", "fsspec", "asyncio", "urllib3", "h5py", "numba", "jax")


def setup_logging(verbose: int, quiet: bool = False) -> None:
    """medrecon's own messages at INFO by default (what a job log holds: progress, what was read and written),
    DEBUG with -v, and with -vv also the libraries' DEBUG messages; -q: warnings only. Libraries log at
    WARNING below -vv, and the noisy ones in :data:`QUIET_LOGGERS` always do."""
    own = logging.WARNING if quiet else logging.INFO if verbose == 0 else logging.DEBUG
    root = logging.DEBUG if verbose >= 2 and not quiet else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(root)
    logging.getLogger("medrecon").setLevel(own)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _log_args(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="more log output: -v debug messages of medrecon, -vv also of the libraries "
                        "(default: medrecon's progress and info messages)")
    p.add_argument("-q", "--quiet", action="store_true", default=default if default is argparse.SUPPRESS else False,
                   help="log warnings and errors only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medrecon", description=plain(__doc__.splitlines()[0]))
    parser.add_argument("--version", action="version", version=f"medrecon {__version__}")
    _log_args(parser, 0)
    # -v / -q after the verb too (SUPPRESS: a verb that does not get them keeps the values given before it)
    log_parent = argparse.ArgumentParser(add_help=False)
    _log_args(log_parent, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (add_args, run) in _VERBS.items():
        text = plain(run.help)  # type: ignore[attr-defined]
        p = sub.add_parser(name, help=text, description=text, parents=[log_parent])
        add_args(p)
        for action in p._actions:
            if action.help and action.help is not argparse.SUPPRESS:
                action.help = plain(action.help)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_after_parse", None) is not None:
        args._after_parse(args)
    setup_logging(args.verbose, args.quiet)
    try:
        return int(args._run(args) or 0)
    except MedreconError as err:
        print(f"medrecon: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
