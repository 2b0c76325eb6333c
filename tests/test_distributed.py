"""The training scripts under torchrun with FSDP2, on CPUs with the gloo backend and 2 processes:
2 ranks x 1 micro-batch give the losses and the checkpoint of 1 process x 2 micro-batches (the same
global batch, the same random streams), the ODE pairs split over the ranks are the one process's, and
a 2-rank run stopped by Ctrl-C resumes as if never stopped."""

import json
import os
import shutil
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

import utils

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def worker(rank, world, port, script, argv, out, interrupt_at):
    """One rank, as torchrun would start it: the environment, one thread, the script's main()."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import causvid as cv
    import train_dmd
    import train_ode
    import utils

    logs, real_log = {}, utils.log
    utils.log = lambda stage, step, total, t0, *a, **values: logs.__setitem__(step, values) or \
        real_log(stage, step, total, t0, *a, **values)
    if interrupt_at and rank == 0:  # Ctrl-C on one rank, during its n-th loss
        name = "ode_regression_loss" if script == "train_ode" else "critic_loss"
        real, calls = getattr(cv, name), [0]

        def interrupted(*a, **kw):
            calls[0] += 1
            if calls[0] == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            return real(*a, **kw)
        setattr(cv, name, interrupted)
    code = 0
    try:
        {"train_ode": train_ode, "train_dmd": train_dmd}[script].main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump({"logs": logs, "code": code}, f)


def launch(world, script, argv, tmp, interrupt_at=0):
    """Run `script` on `world` ranks (mp.spawn, gloo); -> rank 0's logged values per step, exit code."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp / f"result_{world}_{script}")
    mp.spawn(worker, args=(world, port, script, argv, out, interrupt_at), nprocs=world, join=True)
    with open(f"{out}.rank0") as f:
        result = json.load(f)
    return {int(k): v for k, v in result["logs"].items()}, result["code"]


def copy_run(run_dir, dest, names=("teacher.safetensors",)):
    dest.mkdir()
    for name in names:
        shutil.copy(run_dir / name, dest / name)
    shutil.copytree(run_dir / "ode_pairs", dest / "ode_pairs")
    return dest


COMMON = ["--tiny", "--device", "cpu", "--batch-size", "2", "--log-every", "1", "--set", "warmup=1"]


def assert_same(a: dict, b: dict, keys, rtol=1e-4):
    assert sorted(a) == sorted(b)
    for step in a:
        assert sorted(a[step]) == sorted(b[step]), step  # the same values logged (DMD's only on generator turns)
        for k in [k for k in keys if k in b[step]]:
            assert abs(a[step][k] - b[step][k]) <= rtol * (1 + abs(b[step][k])), (step, k, a[step][k], b[step][k])


def assert_same_weights(path_a, path_b, atol=1e-5):
    a, b = utils.load_model(str(path_a)).state_dict(), utils.load_model(str(path_b)).state_dict()
    assert sorted(a) == sorted(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= atol
    assert max((a[k] - utils.load_model(str(path_a).replace("ode.", "teacher.").replace("dmd.", "teacher.")).state_dict()[k])
               .abs().max().item() for k in a) > 0  # trained: not the teacher


def test_ode_regression_on_two_ranks_is_one_process_with_the_same_global_batch_and_resumes_exactly(run_dir, tmp_path):
    """Also: the checkpoint rank 0 gathers equals the one process's; a Ctrl-C on one rank stops both
    after the same step, each saves its shard of the state, and --resume continues bit-identically."""
    one, two, stopped = (copy_run(run_dir, tmp_path / name) for name in ("one", "two", "stopped"))
    args = COMMON + ["--steps", "5", "--pairs", "3"]
    logs1, _ = launch(1, "train_ode", args + ["--run", str(one), "--set", "accumulate=2"], tmp_path)
    logs2, _ = launch(2, "train_ode", args + ["--run", str(two)], tmp_path)
    assert sorted(logs2) == [1, 2, 3, 4, 5]
    assert_same(logs2, logs1, ["loss", "grad_norm"])
    assert_same_weights(two / "ode.safetensors", one / "ode.safetensors")  # gathered into one file by rank 0
    first, code = launch(2, "train_ode", args + ["--run", str(stopped)], tmp_path, interrupt_at=3)
    assert code == 130 and sorted(first) == [1, 2, 3]  # both ranks stopped after step 3 and saved their shards
    assert sorted(p.name for p in stopped.iterdir() if "state" in p.name) == \
        ["ode_state.rank0of2.safetensors", "ode_state.rank1of2.safetensors"]
    resumed, code = launch(2, "train_ode", args + ["--run", str(stopped), "--resume"], tmp_path)
    assert code == 0 and sorted(resumed) == [4, 5]
    assert_same(resumed, {k: logs2[k] for k in resumed}, ["loss", "grad_norm"], rtol=0)  # bit-identical
    assert_same_weights(stopped / "ode.safetensors", two / "ode.safetensors", atol=0)


def test_dmd_on_two_ranks_is_one_process_with_the_same_global_batch(run_dir, tmp_path):
    names = ("teacher.safetensors", "ode.safetensors")
    one, two = copy_run(run_dir, tmp_path / "one", names), copy_run(run_dir, tmp_path / "two", names)
    args = COMMON + ["--steps", "6", "--sample-every", "6"]
    logs1, _ = launch(1, "train_dmd", args + ["--run", str(one), "--set", "accumulate=2"], tmp_path)
    logs2, _ = launch(2, "train_dmd", args + ["--run", str(two)], tmp_path)
    assert_same(logs2, logs1, ["critic", "critic_grad", "dmd", "gen_grad", "dmd_t", "critic_fm", "teacher_fm",
                               "grad_chunk0", "grad_chunk3", "distance"])  # generator turns: 1 and 6
    assert "critic_fm" in logs2[1] and "critic_fm" not in logs2[2] and logs2[6]["distance"] > 0
    assert_same_weights(two / "dmd.safetensors", one / "dmd.safetensors")
    assert (two / "dmd_samples_000006.gif").exists()


def test_ode_pairs_split_over_ranks_are_the_one_process_pairs(run_dir, tmp_path):
    one, two = copy_run(run_dir, tmp_path / "one"), copy_run(run_dir, tmp_path / "two")
    for run in (one, two):
        shutil.rmtree(run / "ode_pairs")
    args = COMMON + ["--steps", "1", "--pairs", "130", "--set", "teacher_steps=6", "--set", "student_step_indices=0,2,4"]
    launch(1, "train_ode", args + ["--run", str(one)], tmp_path)
    launch(2, "train_ode", args + ["--run", str(two)], tmp_path)  # 3 shards of 64: rank 0 writes 0 and 2, rank 1 shard 1
    a, b = utils.ODEPairs(str(one / "ode_pairs")), utils.ODEPairs(str(two / "ode_pairs"))
    assert len(a) == len(b) == 130 and a.prompts == b.prompts
    assert torch.equal(a.get(range(0, 130, 7)), b.get(range(0, 130, 7)))
