"""Hydra and DDP processes: children of one Hydra job (``-m`` sweeps with ``strategy=ddp``), and
processes that an external launcher (torchrun, srun) started.

Lightning's ``ddp`` strategy starts ranks > 0 by re-running the script with ``sys.argv``
(plus ``hydra.run.dir`` of the current run). Under ``-m`` that hands every child ``-m``
and the whole sweep, and after the first job the launcher's environment
(``LOCAL_RANK``, ``MASTER_PORT``, ...) and process group stay behind, so the next job
starts no children at all (Lightning issue 11300). :func:`hydra_job_ddp` fixes both for
the span of one job; ``reid_lightning.cli.train.train`` calls it as::

    with hydra_job_ddp(trainer):
        trainer.fit(module, datamodule=datamodule)
        trainer.test(module, datamodule=datamodule)

Children are then started in single-run mode with the job's own overrides
(``HydraConfig.get().overrides.task``) and write into the job's own output dir.

This module is the package's only user of Lightning's private API: the module-level function
``_hydra_subprocess_cmd`` of ``pytorch_lightning.strategies.launchers.subprocess_script``, which
``_SubprocessScriptLauncher`` calls to build a child's command, and the launcher's ``procs``
list. :func:`check_lightning_api` verifies both and names what moved when a Lightning upgrade
moves them.

Under torchrun or srun every rank (on every node) runs the script itself and Hydra would
make one run dir per process, each named by its own start time. The entry points
therefore call :func:`external_rank_overrides` before Hydra starts: processes of global
rank > 0 write nothing (no ``.hydra/``, no log file, their run dir is the working dir
unless ``hydra.run.dir`` is given); rank 0 of node 0 alone writes the run dir, as with
Lightning's own launcher. Lightning then picks the ranks up from the environment
(``TorchElasticEnvironment``, ``SLURMEnvironment``) and starts no processes itself.
"""
from __future__ import annotations

import dis
import inspect
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytorch_lightning as pl
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd, to_absolute_path
from pytorch_lightning.strategies.launchers import subprocess_script

log = logging.getLogger(__name__)

# set by Lightning's launcher in the process that starts the children
DDP_ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra's command-line flags that choose the config; every other flag or override is rebuilt
CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
# Hydra overrides that make no sense in a child: it runs once, in the job's dir
DROPPED_HYDRA_OVERRIDES = (
    "hydra.mode", "hydra.run.", "hydra.sweep.", "hydra.output_subdir", "hydra.job.name",
    "hydra.sweeper", "hydra/sweeper", "hydra.launcher", "hydra/launcher",
)
CHILD_EXIT_TIMEOUT_S = 120
# the private names of pytorch_lightning.strategies.launchers.subprocess_script that are swapped or read
CHILD_COMMAND_FUNCTION = "_hydra_subprocess_cmd"
LAUNCHER_CLASS = "_SubprocessScriptLauncher"


class LightningAPIChanged(RuntimeError):
    """The installed Lightning no longer has the private launcher API that :func:`hydra_job_ddp` swaps."""


def check_lightning_api() -> None:
    """Check that Lightning still builds its DDP children's commands where :func:`hydra_job_ddp` swaps it.

    Raises:
        LightningAPIChanged: naming the moved symbol and the installed Lightning version, when
            ``subprocess_script._hydra_subprocess_cmd`` is missing or no longer takes ``local_rank``,
            when ``_SubprocessScriptLauncher._call_children_scripts`` no longer looks it up as a
            module global (swapping it would then change nothing), or when the launcher keeps its
            children elsewhere than in ``procs``.
    """
    where = f"pytorch_lightning.strategies.launchers.subprocess_script (pytorch_lightning {pl.__version__})"
    function = getattr(subprocess_script, CHILD_COMMAND_FUNCTION, None)
    if function is None:
        raise LightningAPIChanged(f"{CHILD_COMMAND_FUNCTION} is missing from {where}: {__name__} cannot start "
                                  "DDP children per Hydra job; use a Lightning version that has it")
    if list(inspect.signature(function).parameters) != ["local_rank"]:
        raise LightningAPIChanged(f"{CHILD_COMMAND_FUNCTION}{inspect.signature(function)} of {where} no longer "
                                  f"takes (local_rank): {__name__}.child_command does not fit it")
    launcher = getattr(subprocess_script, LAUNCHER_CLASS, None)
    starter = getattr(launcher, "_call_children_scripts", None)
    if starter is None or not any(
        op.opname == "LOAD_GLOBAL" and op.argval == CHILD_COMMAND_FUNCTION for op in dis.get_instructions(starter)
    ):
        raise LightningAPIChanged(f"{LAUNCHER_CLASS}._call_children_scripts of {where} no longer calls the module's "
                                  f"{CHILD_COMMAND_FUNCTION}: swapping it in {__name__} would have no effect")
    if "procs" not in launcher.__init__.__code__.co_names:
        raise LightningAPIChanged(f"{LAUNCHER_CLASS} of {where} keeps no `procs` list of its children: "
                                  f"{__name__}.release_children cannot end a job's children")

# overrides of a rank > 0 started by an external launcher: it writes no Hydra output
QUIET_RANK_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=stdout")
RUN_DIR_KEYS = ("hydra.run.dir=", "+hydra.run.dir=", "++hydra.run.dir=")


def launcher_rank(environ: Mapping[str, str]) -> int | None:
    """Global rank assigned by an external launcher, or None when none started this process.

    torchrun sets ``RANK`` with ``TORCHELASTIC_RUN_ID``; ``srun`` with several tasks sets
    ``SLURM_PROCID``. (Lightning's own launcher sets neither for its children.)

    Args:
        environ: the process environment (``os.environ``).
    """
    if "TORCHELASTIC_RUN_ID" in environ and "RANK" in environ:
        return int(environ["RANK"])
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return int(environ["SLURM_PROCID"])
    return None


def external_rank_overrides(argv: list[str], environ: Mapping[str, str]) -> list[str]:
    """Hydra overrides to append to ``sys.argv`` of a process that torchrun or srun started.

    Called by the entry points before Hydra parses the command line::

        sys.argv += external_rank_overrides(sys.argv[1:], os.environ)

    Global rank 0 (and any process no external launcher started) gets none. A rank > 0
    gets ``hydra.output_subdir=null`` and ``hydra/job_logging=stdout``, and
    ``hydra.run.dir=.`` unless the command line sets ``hydra.run.dir`` (give the same dir
    on every node to let every rank read it, e.g. for ``resume=true``): its own run dir
    would be named by its own start time, and only rank 0 writes metrics, checkpoints
    and logs.

    Args:
        argv: the command-line arguments (without the script).
        environ: the process environment.

    Raises:
        ValueError: ``-m``/``--multirun`` under torchrun/srun (every process would run the
            whole sweep): sweep with ``hydra/launcher=slurm`` or one launcher call per job.
    """
    rank = launcher_rank(environ)
    if rank is None:
        return []
    if any(arg in ("-m", "--multirun") for arg in argv):
        raise ValueError(
            "-m/--multirun under torchrun or srun would run the whole sweep in every process; start "
            "one torchrun per job, or sweep through SLURM with `-m hydra/launcher=slurm` (extra .[slurm])."
        )
    if rank == 0:
        return []
    overrides = list(QUIET_RANK_OVERRIDES)
    if not any(arg.startswith(RUN_DIR_KEYS) for arg in argv):
        overrides.append("hydra.run.dir=.")
    return overrides


def config_flags(argv: list[str]) -> list[str]:
    """The config-choosing flags of a Hydra command line (``-cn eval``, ``--config-dir=x``), in order."""
    kept: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in CONFIG_FLAGS:
            kept += [arg, next(args, "")]
        elif arg.startswith(tuple(f"{flag}=" for flag in CONFIG_FLAGS)):
            kept.append(arg)
    return kept


def script_command() -> list[str]:
    """How this script was started: ``python /abs/script.py`` or ``python -m package.module``."""
    import __main__  # local import, as Lightning does (its issue 15218)

    if __main__.__spec__ is None:
        return [sys.executable, to_absolute_path(sys.argv[0])]
    return [sys.executable, "-m", __main__.__spec__.name]


def child_command(local_rank: int) -> tuple[list[str], str]:
    """Command and working dir that start rank ``local_rank`` of the current Hydra job.

    Replaces Lightning's ``_hydra_subprocess_cmd`` (same signature): the child runs in
    single-run mode (``hydra.mode=RUN``, even where the config, e.g. an Optuna search,
    asks for multirun) with the job's task overrides, the user's other Hydra overrides,
    and ``hydra.run.dir`` set to the job's output dir; ``hydra.output_subdir=null`` keeps it
    from rewriting the job's ``.hydra/``.
    """
    hydra_cfg = HydraConfig.get()
    hydra_overrides = [o for o in hydra_cfg.overrides.hydra if not o.startswith(DROPPED_HYDRA_OVERRIDES)]
    command = script_command() + config_flags(sys.argv[1:]) + list(hydra_cfg.overrides.task) + hydra_overrides
    command += [
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
        "hydra.output_subdir=null",
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.mode=RUN",
    ]
    return command, get_original_cwd()


def wait_for_children(procs: list[subprocess.Popen], timeout_s: float = CHILD_EXIT_TIMEOUT_S) -> None:
    """Wait until the job's child processes exit; warn about any still running after ``timeout_s``."""
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("DDP child process %d has not exited %ds after its job ended", proc.pid, timeout_s)


def release_children(trainer: pl.Trainer, saved_env: dict[str, str | None], failed: bool) -> None:
    """End the DDP side of a job in the process that started its children (no-op elsewhere).

    The children are taken off the launcher's list, which Lightning's process observer
    watches (a child that exits non-zero after its job must not kill the sweep), killed if
    the job failed (they may wait in a collective for rank 0), and waited for; then the
    process group is destroyed and the DDP environment variables are put back as they
    were before the job.
    """
    procs = getattr(trainer.strategy.launcher, "procs", None)
    if not procs:
        return
    children = list(procs)
    procs.clear()
    if failed:
        for proc in children:
            proc.kill()
    wait_for_children(children)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextmanager
def hydra_job_ddp(trainer: pl.Trainer) -> Iterator[None]:
    """Scope DDP child processes to the current Hydra job (see the module docstring).

    Inside the block, Lightning starts children with :func:`child_command`; while it runs,
    a child that fails still stops the launcher (Lightning's process observer). When the
    block ends, normally or by an error, :func:`release_children` ends the job's children,
    process group and DDP environment, so the next job of a sweep starts its own children
    on a fresh port.

    Raises:
        LightningAPIChanged: the trainer's strategy has a launcher and the installed Lightning
            moved the API swapped here (:func:`check_lightning_api`). A trainer without a
            launcher (one device, or a DDP child) starts no children and is not checked.
    """
    if trainer.strategy.launcher is None:
        yield
        return
    check_lightning_api()
    saved_env = {name: os.environ.get(name) for name in DDP_ENV_VARS}
    lightning_command = subprocess_script._hydra_subprocess_cmd
    subprocess_script._hydra_subprocess_cmd = child_command
    failed = True
    try:
        yield
        failed = False
    finally:
        subprocess_script._hydra_subprocess_cmd = lightning_command
        release_children(trainer, saved_env, failed)
