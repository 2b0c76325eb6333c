"""The training scripts under the real `torchrun` with FSDP2, on CPUs (gloo, 2 processes): the
README's torchrun lines are accepted as written and the toy one runs end to end; 2 ranks x 1
micro-batch give the losses of 1 process x 2 micro-batches (the same global batch, the same random
streams); the ODE pairs split over the ranks are the one process's; SIGINT and SIGTERM save the
state, which resumes on 2 ranks or on 1.

Tolerances (fp32 on every CPU: CAUSVID_CPU_FP32=1). A 2-rank step and a 1-process step differ only
in the order of one fp32 sum (the two micro-batches' gradients: ~1e-7 relative). The losses and
gradient norms inherit that (rtol 1e-4 leaves three orders of magnitude for its growth over a few
steps: a heuristic margin, not a bound). The weights do not, everywhere: where a gradient is itself
rounding noise (|g| ~ 1e-7, above Adam's eps 1e-8) the two runs' Adam updates can take opposite
signs; one Adam update is at most lr (1 - beta1) / sqrt(1 - beta2) in size (3.2 lr at 0.9, 0.999),
so those weights may differ by twice that per update -- the bound the test holds each weight to --
while the losses do not feel it (their gradients are ~0). All weights together must stay within 1e-3
of how far training moved them (a few flipped coordinates, not a drift).
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import causvid as cv
import training
import utils

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not built in"
)

ROOT = Path(__file__).resolve().parent.parent
_bin = Path(sys.executable).parent / "torchrun"
TORCHRUN = (
    [str(_bin)] if _bin.exists() else [sys.executable, "-m", "torch.distributed.run"]
)  # the same launcher
COMMON = ["--tiny", "--device", "cpu", "--batch-size", "2", "--log-every", "1", "--set", "warmup=1"]
ODE_STEPS, DMD_STEPS = 16, 16  # long enough to be stopped part-way
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "CAUSVID_CPU_FP32": "1",
}  # fp32 on any CPU


def torchrun(nproc: int, script: str, args: list[str], **popen) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=N script args`, as a user types it
    (one thread each)."""
    cmd = TORCHRUN + ["--standalone", f"--nproc_per_node={nproc}", script, *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def one_process(script: str, args: list[str], rc: int = 0) -> str:
    """`python script args`; -> its output (stdout and stderr), once it exited with code `rc`."""
    proc = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == rc, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


def read_log(path) -> dict[int, dict]:
    return {r.pop("iteration"): r for r in map(json.loads, Path(path).read_text().splitlines())}


def assert_same(a: dict, b: dict, keys, rtol=1e-4):
    assert sorted(a) == sorted(b)
    for step in a:
        assert sorted(a[step]) == sorted(b[step]), (
            step
        )  # the same values logged (DMD's only on generator turns)
        for k in [k for k in keys if k in b[step]]:
            assert abs(a[step][k] - b[step][k]) <= rtol * (1 + abs(b[step][k])), (
                step,
                k,
                a[step][k],
                b[step][k],
            )


def assert_same_weights(path_a, path_b, init, lr: float, updates: int, betas=(0.9, 0.999)):
    a, b, init = (utils.load_model(str(path)).state_dict() for path in (path_a, path_b, init))
    assert sorted(a) == sorted(b)
    diff, moved = (torch.cat([(x[k] - y[k]).flatten() for k in a]) for x, y in ((a, b), (a, init)))
    bound = 2 * lr * updates * (1 - betas[0]) / (1 - betas[1]) ** 0.5  # see the module's docstring
    assert diff.abs().max() <= bound and diff.norm() <= 1e-3 * moved.norm() and moved.norm() > 0


def copy_run(run_dir, dest, names=("teacher.safetensors",)):
    dest.mkdir()
    for name in names:
        shutil.copy(run_dir / name, dest / name)
    shutil.copytree(run_dir / "ode_pairs", dest / "ode_pairs")
    return dest


def readme_commands() -> list[list[str]]:
    """Every command in the README's bash blocks, continuation lines joined, comments dropped, shell
    variables ($W, $NODE, $HOST) given a value."""
    readme = (ROOT / "README.md").read_text()
    lines = (
        "\n".join(re.findall(r"```bash\n(.*?)```", readme, re.S)).replace("\\\n", " ").splitlines()
    )
    return [
        shlex.split(re.sub(r"\$\w+", "0", line), comments=True)
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_every_readme_command_is_accepted_by_torchrun_and_the_script():
    """torchrun claims any prefix of its own options wherever it appears (`--run` would be
    `--run-path`): each README line goes through torchrun's parser and then the script's."""
    import importlib

    from torch.distributed.run import get_args_parser

    seen = set()
    for cmd in readme_commands():
        if cmd[0] == "torchrun":
            args = get_args_parser().parse_args(cmd[1:])  # exits on an ambiguous option
            script, argv = args.training_script, args.training_script_args
        elif cmd[0] == "python" and cmd[1].endswith(".py"):
            script, argv = cmd[1], cmd[2:]
        else:
            continue
        seen.add(cmd[0])
        module = importlib.import_module(script.removesuffix(".py"))
        if hasattr(module, "parse_args"):
            module.parse_args(argv)
    assert seen == {"python", "torchrun"}


def test_readme_torchrun_toy_pipeline_runs_end_to_end_and_sample_loads_it(tmp_path):
    """The README's toy torchrun line, verbatim but for tiny step counts, from an empty run
    directory (stage 1's pairs, regression, then DMD: rank 1 reads what rank 0 wrote) to a
    dmd.safetensors that sample.py loads in one process."""
    [line] = [c for c in readme_commands() if c[0] == "torchrun" and "--tiny" in c]
    run = tmp_path / "run"
    sizes = [
        "--run-dir",
        str(run),
        "--pairs",
        "4",
        "--ode-steps",
        "2",
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--log-every",
        "1",
        "--sample-every",
        "6",
        "--save-every",
        "2",
    ]
    cmd = TORCHRUN + line[1:] + sizes
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (run / "ode.safetensors").exists() and (run / "dmd.safetensors").exists()
    assert sorted(read_log(run / "dmd_log.jsonl")) == [1, 2, 3, 4, 5, 6]
    assert (
        not (run / "dmd_state").exists() and not (run / "ode_state").exists()
    )  # done: the checkpoints replace them
    one_process(
        "sample.py",
        [
            "--tiny",
            "--run-dir",
            str(run),
            "--device",
            "cpu",
            "--prompt",
            "a red circle moving left",
        ],
    )
    assert (run / "samples_dmd.gif").exists()


def test_ode_regression_on_two_ranks_is_one_process_and_sigint_resumes_exactly(run_dir, tmp_path):
    one, two = (copy_run(run_dir, tmp_path / name) for name in ("one", "two"))
    args = COMMON + ["--steps", str(ODE_STEPS), "--pairs", "3"]
    one_process("train_ode.py", args + ["--run-dir", str(one), "--set", "accumulate=2"])
    finish(torchrun(2, "train_ode.py", args + ["--run-dir", str(two)]))
    logs1, logs2 = read_log(one / "ode_log.jsonl"), read_log(two / "ode_log.jsonl")
    assert sorted(logs2) == list(range(1, ODE_STEPS + 1))
    assert_same(logs2, logs1, ["loss", "grad_norm"])
    assert_same_weights(
        two / "ode.safetensors",
        one / "ode.safetensors",
        one / "teacher.safetensors",
        cv.get_config("tiny").lr_ode,
        ODE_STEPS,
    )

    # Ctrl-C (SIGINT to the launcher, which passes it on) after step 2:
    # both ranks stop after the same step
    stopped = launched_and_stopped(
        lambda: copy_run(run_dir, tmp_path / "stopped"), "train_ode.py", args, 2, signal.SIGINT
    )
    saved = json.loads((stopped / "ode_state" / "run.json").read_text())
    assert saved["ranks"] == 2 and saved["step"] >= 2 and not (stopped / "ode.safetensors").exists()
    assert saved["step"] < ODE_STEPS
    finish(torchrun(2, "train_ode.py", args + ["--run-dir", str(stopped), "--resume"]))
    resumed = read_log(stopped / "ode_log.jsonl")
    assert_same(resumed, logs2, ["loss", "grad_norm"], rtol=0)  # bit-identical


def signal_after(proc: subprocess.Popen, log: Path, lines: int, sig: int) -> int:
    """Send `sig` once the run has logged `lines` lines;
    -> the exit code, once it has saved and exited."""
    return saved_and_exited(proc, signalled(proc, log, lines, sig))


def saved_and_exited(proc: subprocess.Popen, out: str) -> int:
    assert proc.returncode != 0 and "interrupted: saved" in out, out[-3000:]
    return proc.returncode


def signalled(proc: subprocess.Popen, log: Path, lines: int, sig: int) -> str:
    """Send `sig` once the run has logged `lines` lines; -> its output, once it has exited."""
    deadline = time.time() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= lines):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc.communicate(timeout=120)[0]


def launched_and_stopped(
    fresh_dir, script: str, args: list[str], lines: int, sig: int, tries: int = 3
) -> Path:
    """`torchrun` on 2 ranks in fresh_dir(), and `sig` to the launcher once the run has logged
    `lines` lines; -> the run directory, once the run has saved and exited. The launcher passes the
    signal on from its monitor loop, which once (in CI) handled it only after the workers had
    finished: a run that ended (its final weights written) before the signal reached it is made
    again; any other fails."""
    stage = script.removeprefix("train_").removesuffix(".py")
    for _ in range(tries):  # runs in all
        run = fresh_dir()
        proc = torchrun(2, script, args + ["--run-dir", str(run)])
        out = signalled(proc, run / f"{stage}_log.jsonl", lines, sig)
        if not (run / f"{stage}.safetensors").exists():
            saved_and_exited(proc, out)
            return run
        shutil.rmtree(run)
    raise AssertionError(
        f"{tries} runs ended before {signal.Signals(sig).name} stopped them "
        "(the launcher passed it on late, or the workers ignored it); "
        f"the last one's output:\n{out[-3000:]}"
    )


def test_dmd_on_two_ranks_is_one_process_and_sigterm_resumes_from_two_ranks_on_one_and_back(
    run_dir, tmp_path
):
    names = ("teacher.safetensors", "ode.safetensors")
    one, two = (copy_run(run_dir, tmp_path / n, names) for n in ("one", "two"))
    # with Self-Forcing's EMA
    # (an AveragedModel, sharded like the generator, saved and resharded with it)
    args = COMMON + [
        "--no-scorecard",
        "--steps",
        str(DMD_STEPS),
        "--sample-every",
        "1000",
        "--set",
        "generator_ema=0.5",
        "--set",
        "generator_ema_start=4",
    ]
    one_process("train_dmd.py", args + ["--run-dir", str(one), "--set", "accumulate=2"])
    finish(torchrun(2, "train_dmd.py", args + ["--run-dir", str(two)]))
    logs1, logs2 = read_log(one / "dmd_log.jsonl"), read_log(two / "dmd_log.jsonl")
    keys = [
        "critic",
        "critic_grad",
        "dmd",
        "gen_grad",
        "dmd_t",
        "critic_fm",
        "teacher_fm",
        "grad_chunk0",
        "distance",
    ]
    assert_same(logs2, logs1, keys)  # generator turns: 1, 6, 11, ...
    assert (
        "critic_fm" in logs2[1] and "critic_fm" not in logs2[2] and logs2[DMD_STEPS]["distance"] > 0
    )
    turns = (DMD_STEPS + 4) // 5  # generator updates
    assert_same_weights(
        two / "dmd.safetensors",
        one / "dmd.safetensors",
        one / "ode.safetensors",
        cv.get_config("tiny").lr_generator,
        turns,
    )

    # SIGTERM (what a cluster sends before it preempts) to the launcher after iteration 3 ...
    stopped = launched_and_stopped(
        lambda: copy_run(run_dir, tmp_path / "stopped", names),
        "train_dmd.py",
        args,
        3,
        signal.SIGTERM,
    )
    k = json.loads((stopped / "dmd_state" / "run.json").read_text())["step"]
    assert 3 <= k < DMD_STEPS - 4, k
    # ... resumes on 1 process, which needs accumulate 2
    # (DCP reshards; the streams are per micro-batch),
    out = one_process("train_dmd.py", args + ["--run-dir", str(stopped), "--resume"], rc=2)
    assert (
        "resume with ranks x accumulate = 2 (the same global batch), e.g. --set accumulate=2" in out
    )
    again = subprocess.Popen(
        [
            sys.executable,
            "train_dmd.py",
            *args,
            "--run-dir",
            str(stopped),
            "--resume",
            "--set",
            "accumulate=2",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert (
        signal_after(again, stopped / "dmd_log.jsonl", k + 2, signal.SIGTERM)
        == 128 + signal.SIGTERM
    )
    k2 = json.loads((stopped / "dmd_state" / "run.json").read_text())
    assert k2["ranks"] == 1 and k + 2 <= k2["step"] < DMD_STEPS, k2
    # ... which SIGTERM stops again, and the rest runs on 2 ranks: 2 -> 1 -> 2,
    # the losses of the straight run
    finish(torchrun(2, "train_dmd.py", args + ["--run-dir", str(stopped), "--resume"]))
    assert_same(read_log(stopped / "dmd_log.jsonl"), logs2, keys)
    assert_same_weights(
        stopped / "dmd.safetensors",
        two / "dmd.safetensors",
        one / "ode.safetensors",
        cv.get_config("tiny").lr_generator,
        turns,
    )  # the EMA came through both reshards


def test_missing_ode_pairs_split_over_ranks_are_the_one_process_pairs(run_dir, tmp_path):
    """130 pairs, 3 shards of 64: with shard 0 already written (a resumed run) rank 0 makes shard 1
    and rank 1 shard 2; every rank lists what is missing before any rank writes."""
    one, two = copy_run(run_dir, tmp_path / "one"), copy_run(run_dir, tmp_path / "two")
    for run in (one, two):
        shutil.rmtree(run / "ode_pairs")
    args = COMMON + [
        "--steps",
        "1",
        "--pairs",
        "130",
        "--set",
        "teacher_steps=6",
        "--set",
        "student_step_indices=0,2,4",
    ]
    one_process("train_ode.py", args + ["--run-dir", str(one)])
    (two / "ode_pairs").mkdir()
    shutil.copy(training.ODEPairs.shard(str(one / "ode_pairs"), 0), two / "ode_pairs")
    out = finish(torchrun(2, "train_ode.py", args + ["--run-dir", str(two)]))
    assert (
        "ODE pairs: 100%|██████████| 1/1" in out
    )  # rank 0 made one shard (rank 1's bar is silent)
    a, b = training.ODEPairs(str(one / "ode_pairs")), training.ODEPairs(str(two / "ode_pairs"))
    assert len(a) == len(b) == 130 and a.prompts == b.prompts
    assert torch.equal(a.get(range(0, 130, 7)), b.get(range(0, 130, 7)))


def test_process_group_and_precision_on_gpus():
    """What a CPU cannot run, checked as configuration: on GPUs the process group has a CPU
    backend beside NCCL (the logged losses and the stop flag are CPU tensors), and FSDP2 gathers
    bf16 weights and reduces fp32 gradients; on CPUs gloo and fp32."""
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert training.backend(gpu) == "cpu:gloo,cuda:nccl" and training.backend(cpu) == "gloo"
    policy = training.mixed_precision(gpu)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert training.mixed_precision(cpu).param_dtype is None
