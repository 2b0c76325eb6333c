"""The scripts fail well and recover: one-line errors for bad input, atomic checkpoints, --resume
that continues exactly, determinism, and a guard against NaN."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

import causvid as cv
import sample
import toy_world as toy
import train_dmd
import train_ode
import training
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red square moving up"


# ---------------------------------------------------------------------------------------------
# Bad input -> one line that says what is wrong and how to fix it
# ---------------------------------------------------------------------------------------------


def sample_args(run_dir, *extra):
    return ["--tiny", "--run-dir", str(run_dir), "--device", "cpu", "--prompt", PROMPT, *extra]


def test_missing_checkpoint(run_dir, tmp_path):
    with pytest.raises(cv.CausVidError, match="not found; check the path"):
        sample.main(sample_args(run_dir, "--ckpt", str(tmp_path / "nope.safetensors")))


def test_not_a_checkpoint_and_truncated(run_dir, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(cv.CausVidError, match="not a readable .safetensors checkpoint"):
        sample.main(sample_args(run_dir, "--ckpt", str(junk)))
    data = (run_dir / "dmd.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(cv.CausVidError, match="truncated"):
        sample.main(sample_args(run_dir, "--ckpt", str(cut)))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(cv.CausVidError, match="not a CausVid checkpoint"):
        utils.load_model(str(tmp_path / "foreign.safetensors"))


def test_checkpoint_of_another_preset(run_dir):
    with pytest.raises(
        cv.CausVidError, match="holds a 'tiny' model but the preset asked for is 'wan2.1-t2v-1.3b'"
    ):
        sample.main(
            [
                "--config",
                "wan2.1-t2v-1.3b",
                "--run-dir",
                str(run_dir),
                "--device",
                "cpu",
                "--ckpt",
                str(run_dir / "dmd.safetensors"),
                "--prompt",
                PROMPT,
            ]
        )


@pytest.mark.parametrize("frames", ["7", "0", "-3"])
def test_bad_frame_counts(run_dir, frames):
    with pytest.raises(cv.CausVidError, match="must be a positive multiple of the chunk size 3"):
        sample.main(sample_args(run_dir, "--num-frames", frames))


def test_bad_prompts(run_dir):
    with pytest.raises(cv.CausVidError, match="is empty; give a text prompt"):
        sample.main(["--tiny", "--run-dir", str(run_dir), "--prompt", "  "])
    enc = toy.read_text_encoder(str(run_dir / "teacher.safetensors"))
    for bad in [[], "a red square moving up", [PROMPT, 3], None]:
        with pytest.raises(cv.CausVidError, match="prompts must be a non-empty list of strings"):
            enc(bad)


def test_long_prompt_is_truncated_with_a_warning(run_dir):
    enc = toy.read_text_encoder(str(run_dir / "teacher.safetensors"))
    long = "a red square moving up " * 4  # 92 bytes > text_len 32
    with pytest.warns(
        UserWarning, match="longer than the text length 32; only its first 32 tokens are used"
    ):
        out = enc([long])
    assert out.shape == (1, 32, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc([PROMPT])  # a short prompt warns nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(run_dir):
    with pytest.raises(cv.CausVidError, match="torch sees no CUDA GPU; use --device cpu"):
        sample.main(["--tiny", "--run-dir", str(run_dir), "--device", "cuda"])


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    with pytest.raises(
        cv.CausVidError, match="cannot write to --run-dir .* pass a directory you can write to"
    ):
        train_ode.main(["--tiny", "--run-dir", str(blocker / "run")])


def test_contradicting_presets():
    with pytest.raises(cv.CausVidError, match="contradict"):
        sample.main(["--tiny", "--config", "wan2.1-t2v-1.3b"])
    with pytest.raises(cv.CausVidError, match="choose a preset"):
        sample.main([])


def test_the_first_chunks_levers_refuse_what_they_cannot_do(run_dir, tmp_path):
    """first_chunk_step_indices that do not start at pure noise and increase; a video-to-video
    start the first chunk's steps lack; the lever in a DMD run without the rollout it trains
    through; a bidirectional model as --first-chunk-teacher; an empty tuple where one is needed."""
    before = sorted(run_dir.iterdir())
    for bad in ["3,9,15", "0,9,3", "0,6,24"]:
        with pytest.raises(cv.CausVidError, match="must start at 0 .* and increase, each below"):
            sample.main(sample_args(run_dir, "--set", f"first_chunk_step_indices={bad}"))
    video = str(tmp_path / "v.npz")
    np.savez(video, frames=np.zeros((1, 12, 16, 16, 3), np.uint8), prompts=np.array([PROMPT]))
    odd = ["--set", "first_chunk_step_indices=0,4,8,16,20", "--video", video, "--strength", "0.5"]
    with pytest.raises(cv.CausVidError, match="first_chunk_step_indices lacks; add it"):
        sample.main(sample_args(run_dir, *odd))
    with pytest.raises(cv.CausVidError, match="add --set self_forcing=true"):
        train_dmd.main(
            ["--tiny", "--run-dir", str(tmp_path), "--ode", str(run_dir / "ode.safetensors")]
            + ["--steps", "1", "--set", "first_chunk_step_indices=0,3,6,9,12,15,18,21"]
        )
    teacher = toy.ToyWorld.pretrained_teacher
    with pytest.raises(cv.CausVidError, match="is a bidirectional model; give a causal"):
        sample.main(sample_args(run_dir, "--first-chunk-teacher", teacher))
    with pytest.raises(cv.CausVidError, match="is not a valid tuple"):
        sample.main(sample_args(run_dir, "--set", "student_step_indices="))
    assert sorted(run_dir.iterdir()) == before and not list(tmp_path.glob("*.safetensors"))


def test_the_scripts_print_one_line_and_exit_2(tmp_path):
    for script in ["sample.py", "train_dmd.py"]:
        r = subprocess.run(
            [
                sys.executable,
                script,
                "--tiny",
                "--run-dir",
                str(tmp_path),
                "--device",
                "cpu",
                "--ckpt" if script == "sample.py" else "--ode",
                str(tmp_path / "missing.safetensors"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "not found" in lines[0]
        assert not any(p.name.endswith(".npz") for p in tmp_path.iterdir())  # nothing half-written


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic, never unpickled
# ---------------------------------------------------------------------------------------------


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint(run_dir, tmp_path, monkeypatch):
    path = str(tmp_path / "model.safetensors")
    model = utils.load_model(str(run_dir / "ode.safetensors"))
    training.save_model(path, model, stage="first")
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def dies_halfway(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # a half-written file, then the process "dies"
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        training.save_model(path, cv.DiT(model.cfg, causal=True), stage="second")
    monkeypatch.undo()
    tensors, _, meta = utils.load_checkpoint(path)
    assert meta["stage"] == "first"
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left behind


def test_nothing_is_unpickled():
    for name in [
        "causvid.py",
        "toy_world.py",
        "wan.py",
        "utils.py",
        "training.py",
        "train_ode.py",
        "train_dmd.py",
        "sample.py",
        "study.py",
        "bench.py",
    ]:
        source = open(os.path.join(ROOT, name)).read()
        assert not re.search(r"import pickle|pickle\.loads?\(|allow_pickle=True", source)
        calls = re.findall(r"torch\.load\([^)]*\)", source)
        assert all("weights_only=True" in c for c in calls), calls


# ---------------------------------------------------------------------------------------------
# --resume continues exactly; Ctrl-C saves; NaN stops with the step named
# ---------------------------------------------------------------------------------------------


def record_logs(monkeypatch):
    """Every value training.log prints (both scripts log through it), keyed by (stage, step)."""
    seen = {}
    real = training.log

    def log(stage, step, total, t0, *a, **values):
        seen[(stage, step)] = values
        real(stage, step, total, t0, *a, **values)

    monkeypatch.setattr(training, "log", log)
    return seen


def interrupt_at_call(monkeypatch, module, name, n):
    """Send ourselves Ctrl-C (SIGINT) during the n-th call of module.name."""
    real, calls = getattr(module, name), [0]

    def wrapped(*a, **kw):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapped)


def test_ode_resume_gives_the_same_losses(fresh_run, tmp_path_factory, monkeypatch):
    os.remove(fresh_run / "ode.safetensors")
    other = tmp_path_factory.mktemp("again")
    (other / "teacher.safetensors").write_bytes((fresh_run / "teacher.safetensors").read_bytes())
    shutil.copytree(fresh_run / "ode_pairs", other / "ode_pairs")
    common = [
        "--tiny",
        "--device",
        "cpu",
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--log-every",
        "1",
        "--pairs",
        "3",
    ]

    straight = record_logs(monkeypatch)
    train_ode.main(common + ["--run-dir", str(fresh_run)])
    monkeypatch.undo()

    resumed = record_logs(monkeypatch)
    interrupt_at_call(monkeypatch, cv, "ode_regression_loss", 4)
    with pytest.raises(SystemExit) as stop:
        train_ode.main(common + ["--run-dir", str(other)])
    assert stop.value.code == 130 and (other / "ode_state" / "run.json").exists()
    assert not (other / "ode.safetensors").exists() and max(s for _, s in resumed) == 4
    monkeypatch.undo()
    resumed = record_logs(monkeypatch)
    train_ode.main(common + ["--run-dir", str(other), "--resume"])
    assert sorted(resumed) == [("ode", 5), ("ode", 6)]
    for key in resumed:
        assert resumed[key] == straight[key]  # bit-identical losses and gradient norms
    assert not (other / "ode_state").exists()  # done: the checkpoint replaces the state
    a, b = (
        utils.load_model(str(fresh_run / "ode.safetensors")),
        utils.load_model(str(other / "ode.safetensors")),
    )
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_flow_matching_resume_keeps_the_schedule_and_the_ema(tmp_path, monkeypatch):
    """The pre-training loop's learning-rate schedule (torch's LinearLR then CosineAnnealingLR) and
    EMA (torch's AveragedModel) are part of its saved state: stopped by Ctrl-C after step 3 of 6 and
    resumed, it saves the weights of a run never stopped, bit for bit."""
    cfg, cpu = cv.get_config("tiny", batch_size=2, warmup=2), torch.device("cpu")
    text_encoder = toy.tiny_text_encoder(cfg)

    world = toy.ToyWorld(replace(cfg, ema_decay=0.5), cpu)
    job = training.Pretraining(
        "teacher", steps=6, lr=1e-3, seed=0, loss=training.clip_flow_matching
    )

    def train(path, resume=False):
        torch.manual_seed(0)  # the same initial weights, which a resumed run then replaces
        flags = training.LoopFlags(resume=resume, log_every=1)
        return training.train_flow_matching(cv.DiT(cfg), text_encoder, job, world, str(path), flags)

    straight = train(tmp_path / "straight.safetensors").state_dict()
    interrupt_at_call(monkeypatch, cv, "flow_matching_loss", 3)
    with pytest.raises(SystemExit):
        train(tmp_path / "stopped.safetensors")
    monkeypatch.undo()
    assert json.loads((tmp_path / "stopped_state" / "run.json").read_text())["step"] == 3
    resumed = train(tmp_path / "stopped.safetensors", resume=True).state_dict()
    assert all(torch.equal(v, resumed[k]) for k, v in straight.items())


@pytest.mark.parametrize("warmup", [10, 1, 0])
def test_the_learning_rate_warms_up_then_decays_as_a_cosine(warmup):
    """training.warmup_cosine: step s of `total` runs at peak (s + 1) / warmup while s < warmup,
    then at peak (1 + cos(pi (s - warmup) / (total - warmup))) / 2 (torch's recurrence for the
    cosine agrees with the closed form to rounding: rel 1e-9 is a million times the float64 error of
    30 steps); --set warmup=0 is the cosine alone."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = training.warmup_cosine(opt, total=30, warmup=warmup)
    for s in range(30):
        want = (
            2.0 * (s + 1) / warmup
            if s < warmup
            else 2.0 * (1 + math.cos(math.pi * (s - warmup) / (30 - warmup))) / 2
        )
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9, abs=1e-12), s
        opt.step()
        schedule.step()


@pytest.mark.parametrize("warmup", [0, 3])
def test_dmd_resume_gives_the_same_losses(fresh_run, tmp_path_factory, monkeypatch, warmup):
    """warmup 3: stopped in the critic's warm-up, when the generator's optimizer has no state yet
    (it is saved without one, not stepped at lr 0 to make one)."""
    other = tmp_path_factory.mktemp("again")
    for name in ["teacher.safetensors", "ode.safetensors"]:
        (other / name).write_bytes((fresh_run / name).read_bytes())
    common = [
        "--tiny",
        "--no-scorecard",
        "--device",
        "cpu",
        "--steps",
        "7",
        "--batch-size",
        "2",
        "--log-every",
        "1",
        "--sample-every",
        "1000",
        "--set",
        f"critic_warmup={warmup}",
    ]
    straight = record_logs(monkeypatch)
    train_dmd.main(common + ["--run-dir", str(fresh_run)])
    monkeypatch.undo()

    interrupt_at_call(monkeypatch, cv, "critic_loss", 3)
    with pytest.raises(SystemExit):
        train_dmd.main(common + ["--run-dir", str(other)])
    monkeypatch.undo()
    resumed = record_logs(monkeypatch)
    train_dmd.main(common + ["--run-dir", str(other), "--resume"])
    assert sorted(s for _, s in resumed) == list(range(4, 8 + warmup))
    for (
        key,
        values,
    ) in resumed.items():  # every value, the diagnostics and the distance moved included
        assert values == straight[key]
    first = 6 if warmup == 0 else warmup + 1  # the first generator step after the stop (ratio 5)
    assert set(resumed[("dmd", first)]) >= {"dmd", "gen_grad", "critic"}


def test_resume_refuses_another_config(fresh_run, monkeypatch):
    os.remove(fresh_run / "ode.safetensors")
    interrupt_at_call(monkeypatch, cv, "ode_regression_loss", 1)
    with pytest.raises(SystemExit):
        train_ode.main(
            [
                "--tiny",
                "--run-dir",
                str(fresh_run),
                "--steps",
                "4",
                "--batch-size",
                "2",
                "--pairs",
                "3",
            ]
        )
    monkeypatch.undo()
    with pytest.raises(
        cv.CausVidError, match="saved with another config .*batch_size.*resume with the same flags"
    ):
        train_ode.main(
            [
                "--tiny",
                "--run-dir",
                str(fresh_run),
                "--steps",
                "4",
                "--batch-size",
                "3",
                "--pairs",
                "3",
                "--resume",
            ]
        )


def test_nan_stops_training_naming_the_step(fresh_run, monkeypatch):
    os.remove(fresh_run / "ode.safetensors")
    real, calls = cv.ode_regression_loss, [0]

    def poisoned(*a, **kw):
        calls[0] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls[0] == 3 else loss

    monkeypatch.setattr(cv, "ode_regression_loss", poisoned)
    with pytest.raises(
        training.NonFiniteError,
        match=r"ODE regression stopped at step 3: the loss is nan; .*"
        r"last good state \(after step 2\) is in .*ode_state",
    ):
        train_ode.main(
            [
                "--tiny",
                "--run-dir",
                str(fresh_run),
                "--steps",
                "5",
                "--batch-size",
                "2",
                "--pairs",
                "3",
            ]
        )
    assert json.loads((fresh_run / "ode_state" / "run.json").read_text())["step"] == 2
    assert not (fresh_run / "ode.safetensors").exists()
    monkeypatch.undo()  # the last good state resumes to finite losses and a finite student
    logs = record_logs(monkeypatch)
    train_ode.main(
        [
            "--tiny",
            "--run-dir",
            str(fresh_run),
            "--steps",
            "5",
            "--batch-size",
            "2",
            "--pairs",
            "3",
            "--resume",
            "--log-every",
            "1",
        ]
    )
    assert sorted(logs) == [("ode", 3), ("ode", 4), ("ode", 5)] and all(
        math.isfinite(v["loss"]) for v in logs.values()
    )
    assert all(
        torch.isfinite(v).all()
        for v in utils.load_model(str(fresh_run / "ode.safetensors")).state_dict().values()
    )


def test_nan_gradient_is_not_applied():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    loss = p.sqrt().sum()  # finite (0) loss, infinite gradient 1 / (2 sqrt(0))
    with pytest.raises(training.NonFiniteError, match="gradient norm is inf"):
        training.optimizer_step(loss, opt, [p], clip=1.0)
    assert torch.equal(p.detach(), torch.zeros(3)) and not opt.state  # nothing was applied


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_samples_bitwise(run_dir):
    frames = {}
    for name, seed in [("a", 5), ("b", 5), ("c", 6)]:
        sample.main(
            sample_args(
                run_dir,
                "--prompt",
                "a cyan circle moving left",
                "--seed",
                str(seed),
                "--name",
                name,
            )
        )
        frames[name] = np.load(run_dir / f"{name}.npz")["frames"]
    assert np.array_equal(frames["a"], frames["b"])
    assert not np.array_equal(frames["a"], frames["c"])
