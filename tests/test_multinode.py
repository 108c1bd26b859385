"""Several nodes: two torchrun "nodes" on localhost train like one machine, rank 0 of node 0 alone
writes; rank > 0 of an external launcher writes no Hydra output; the SLURM launcher preset."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import CONF_DIR, REPO_ROOT, run_script, script_command
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from test_ddp import TINY, small_demo_root  # noqa: F401  (fixture)

from reid_lightning.launch.hydra_ddp import external_rank_overrides, launcher_rank


class RecordSharding(pl.Callback):
    """Writes ``out_dir/shard_rank<r>.json`` at the start of training: the ranks Lightning and the
    identity sampler see, and the per-rank batch size. Listed in a run's config as
    ``+callbacks.shard._target_=test_multinode.RecordSharding +callbacks.shard.out_dir=DIR``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        identities = loader.sampler.sampler  # the IdentitySampler inside the per-sample seeding wrapper
        record = {
            "global_rank": trainer.global_rank, "world_size": trainer.world_size, "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank, "cluster": type(trainer.strategy.cluster_environment).__name__,
            "sampler_rank": identities.rank, "sampler_world": identities.world_size,
            "batch_size": loader.batch_size,
        }
        (self.out_dir / f"shard_rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_nodes_train_like_one_machine(small_demo_root: Path, tmp_path: Path) -> None:  # noqa: F811
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    args = [
        *TINY, "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2",
        "++data.batches_per_epoch=3", "solver.max_epochs=2", "solver.eval_period=2",
        "~callbacks.lr_monitor", "~callbacks.progress_bar", "~callbacks.model_summary",
        "+callbacks.dump_state._target_=test_ddp.DumpModelState", f"+callbacks.dump_state.out_dir={dumps}",
        "+callbacks.shard._target_=test_multinode.RecordSharding", f"+callbacks.shard.out_dir={dumps}",
        "+hooks.rec._target_=hooks_support.Recorder", f"+hooks.rec.out_dir={dumps}",
        f"paths.data_dir={small_demo_root}",
    ]
    command, env = script_command("train.py", args)
    port = _free_port()
    procs = []
    for node in (0, 1):  # the same command on both "nodes", each from its own working dir
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                    "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
        procs.append(subprocess.Popen(torchrun + command[1:], cwd=cwd, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"torchrun node failed: rc={proc.returncode}\n{out[-8000:]}"

    # node 1 wrote nothing; node 0 holds the one run dir with one metrics.json
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "node1").rglob("*")) == []
    (metrics_file,) = tmp_path.rglob("metrics.json")
    run_dir = metrics_file.parent
    assert run_dir.is_relative_to(tmp_path / "node0" / "outputs")
    assert len(list(run_dir.glob("csv/version_*"))) == 1 and (run_dir / ".hydra" / "config.yaml").is_file()
    assert len(list((run_dir / "checkpoints").glob("*.ckpt"))) == 2

    # world size = nodes x devices: Lightning's ranks, the sampler's split and the per-rank batch
    shards = [json.loads((dumps / f"shard_rank{r}.json").read_text()) for r in (0, 1)]
    for rank, shard in enumerate(shards):
        assert shard == {"global_rank": rank, "world_size": 2, "node_rank": rank, "local_rank": 0,
                         "cluster": "TorchElasticEnvironment", "sampler_rank": rank, "sampler_world": 2,
                         "batch_size": 16}, shard
    # hooks see the global iteration numbers on both nodes
    records = [json.loads((dumps / f"rec_rank{r}.json").read_text()) for r in (0, 1)]
    steps = [[event[2] for event in record["events"] if event[1] == "after_step"] for record in records]
    assert steps[0] == steps[1] == list(range(6)) and records[0]["gathered"] == [0, 1]

    # identical weights on both ranks, and the checkpoint holds them
    ends = [torch.load(dumps / f"train_end_rank{r}.pt") for r in (0, 1)]
    starts = [torch.load(dumps / f"test_start_rank{r}.pt") for r in (0, 1)]
    params = [k for k in ends[0]["state"] if "running_" not in k and "num_batches_tracked" not in k]
    assert len(params) > 60
    assert [k for k in params if not torch.equal(ends[0]["state"][k], ends[1]["state"][k])] == []
    assert [k for k in starts[0]["state"] if not torch.equal(starts[0]["state"][k], starts[1]["state"][k])] == []
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    saved = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert [k for k in saved if not torch.equal(saved[k], starts[0]["state"][k])] == []

    # the 2-node test (queries split across the ranks) equals one process evaluating the checkpoint
    eval_dir = tmp_path / "eval"
    run_script("eval.py", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer=cpu", "cmc_curve=false",
                           f"hydra.run.dir={eval_dir}"], cwd=tmp_path)
    multi, single = json.loads(metrics_file.read_text()), json.loads((eval_dir / "metrics.json").read_text())
    assert set(multi) == set(single) == {"Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"}
    for name, value in single.items():
        assert multi[name] == pytest.approx(value, abs=1.5e-4), name


def test_external_rank_overrides_silence_ranks_above_zero() -> None:
    torchrun = {"TORCHELASTIC_RUN_ID": "none", "RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1"}
    srun = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}
    assert launcher_rank({}) is None and launcher_rank({"LOCAL_RANK": "1"}) is None  # Lightning's own children
    assert launcher_rank(torchrun) == 1 and launcher_rank(srun) == 3
    assert launcher_rank({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # one sbatch task
    assert external_rank_overrides(["seed=1"], {}) == []
    assert external_rank_overrides(["seed=1"], {**torchrun, "RANK": "0"}) == []
    assert external_rank_overrides(["seed=1"], torchrun) == [
        "hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=.",
    ]
    # a run dir given on the command line is kept (the same on every node)
    assert external_rank_overrides(["hydra.run.dir=/shared/run"], srun) == [
        "hydra.output_subdir=null", "hydra/job_logging=stdout",
    ]
    with pytest.raises(ValueError, match="-m/--multirun under torchrun or srun"):
        external_rank_overrides(["-m", "seed=1,2"], {**torchrun, "RANK": "0"})


def test_slurm_launcher_preset_composes_with_the_trainer() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4",
            "hydra.launcher.partition=gpu",
        ])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.timeout_min > 0 and launcher.mem_gb > 0
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy) == (2, 4, "ddp")
    assert (REPO_ROOT / "conf" / "hydra" / "launcher" / "slurm.yaml").is_file()


@pytest.mark.slow
def test_sweep_through_submitits_local_executor(demo_root: Path, tmp_path: Path) -> None:
    """The submitit launcher runs scripts/train.py's job in a pickled worker process (here the
    local executor: SLURM itself is not available offline) and the sweep dir gets metrics + summary."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    run_script("train.py", [
        "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15",
        "hydra.launcher.nodes=${trainer.num_nodes}", "hydra.launcher.tasks_per_node=${trainer.devices}",
        "experiment=quickstart", "model=bot_r18", "model.pretrained=none", "data.height=64", "data.width=32",
        "data.num_workers=0", "++data.batches_per_epoch=2", "solver.max_epochs=1", "solver.eval_period=1",
        "trainer=cpu", "callbacks=none", "hooks=none", "logger=csv", f"paths.data_dir={demo_root}",
        f"hydra.sweep.dir={sweep_dir}", "seed=1",
    ], cwd=tmp_path)
    metrics = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    assert set(metrics) == {"Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"}
    assert list(sweep_dir.glob(".submitit/*/*_0_log.out")) and (sweep_dir / "summary.md").is_file()
