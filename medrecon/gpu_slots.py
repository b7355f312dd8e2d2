"""One GPU per job on a multi-GPU machine: ``python -m medrecon.gpu_slots N -- CMD ...``.

Snakemake counts GPU jobs (``resources: gpu=1`` against ``--resources gpu=N``) but does not say *which* GPU a
job gets, so without help every local job would run on GPU 0. This wrapper claims ``N`` free GPUs by taking an
exclusive ``flock`` on ``<lock dir>/gpu<id>.lock``, sets ``CUDA_VISIBLE_DEVICES`` to them and ``exec``\\ s CMD.
The lock belongs to the open file that CMD inherits, so the kernel frees the slot however CMD ends (SIGKILL
included): there are no stale slots to clean up.

Nothing is claimed (CMD runs as it is) when ``N`` is 0, or when no more than ``N`` GPUs are visible, e.g. in a
SLURM job, where SLURM has already set ``CUDA_VISIBLE_DEVICES`` to the job's own GPUs. All jobs of one user on
one machine share the lock directory (``$MEDRECON_GPU_LOCK_DIR``, default ``<tmp>/medrecon-gpu-slots-<uid>``),
so two studies run side by side also spread over the GPUs. A job that finds every GPU taken waits for one.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


def visible_gpus(environ: dict[str, str] | None = None) -> list[str]:
    """The CUDA device ids a job on this machine may use, without importing torch (Snakefile-cheap).

    ``CUDA_VISIBLE_DEVICES`` when set (CUDA ignores everything from the first invalid entry, e.g. ``-1``);
    else the NVIDIA driver's GPU list (``/proc/driver/nvidia/gpus``, then ``nvidia-smi -L``).
    """
    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env:
        ids = []
        for item in env["CUDA_VISIBLE_DEVICES"].split(","):
            item = item.strip()
            if not item or item.startswith("-"):
                break
            ids.append(item)
        return ids
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return [str(i) for i in range(len(list(proc.iterdir())))]
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [str(i) for i, _ in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]
    return []


def default_lock_dir() -> Path:
    """Shared by all of this user's jobs on this machine, so concurrent runs see each other's GPU claims."""
    env = os.environ.get("MEDRECON_GPU_LOCK_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"medrecon-gpu-slots-{os.getuid()}"


def claim(n: int, ids: Sequence[str], lock_dir: Path, poll_s: float = 0.5) -> tuple[list[str], list[int]]:
    """Lock ``n`` of the GPUs ``ids`` (waiting while they are taken); returns their ids and the open lock fds.

    The fds are inheritable: keep them open for as long as the GPUs are in use (``exec`` keeps them).
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        got: list[str] = []
        fds: list[int] = []
        for gpu in ids:
            fd = os.open(lock_dir / f"gpu{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.set_inheritable(fd, True)
            got.append(gpu)
            fds.append(fd)
            if len(got) == n:
                return got, fds
        for fd in fds:
            os.close(fd)
        if not waited:
            print(f"medrecon.gpu_slots: all of GPUs {','.join(ids)} are in use (locks in {lock_dir}); waiting",
                  file=sys.stderr, flush=True)
            waited = True
        time.sleep(poll_s)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m medrecon.gpu_slots", usage="%(prog)s N [--lock-dir DIR] -- CMD ...",
                                description=__doc__.splitlines()[0])
    p.add_argument("gpus", type=int, help="GPUs the job uses (its Snakemake `gpu` resource); 0 = none")
    p.add_argument("--lock-dir", type=Path, default=None, help="where the slot locks live")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    a, cmd = p.parse_args(argv[:split]), argv[split + 1:]
    if not cmd:
        p.error("no command given after --")
    ids = visible_gpus() if a.gpus > 0 else []
    if len(ids) > a.gpus:
        got, _fds = claim(a.gpus, ids, a.lock_dir or default_lock_dir())
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(got)
        print(f"medrecon.gpu_slots: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}", file=sys.stderr,
              flush=True)
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)

if __name__ == "__main__":
    main()
