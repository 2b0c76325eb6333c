"""The toy world follows shared/toy_world.md to the pixel, its scores mean what they say, and the
three scripts run end to end with --tiny into a temporary directory."""

import json
import math
import os
import shutil

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from test_distributed import one_process  # `python script args` in a subprocess, as typed

import causvid as cv
import sample
import successors
import toy_world as toy
import train_dmd
import train_ode
import training
import utils
import wan

CIRCLE = """
..##..
.####.
######
######
.####.
..##..
"""


def test_circle_mask_is_the_drawing():
    expect = torch.tensor([[c == "#" for c in row] for row in CIRCLE.split()])
    assert torch.equal(toy.shape_mask("circle"), expect)
    assert toy.shape_mask("circle").sum() == 24 and toy.shape_mask("square").sum() == 36


def test_bounce_at_the_walls():
    xs = [x for x, _ in toy.trajectory(8, 4, "right", 6)]
    assert xs == [8, 9, 10, 9, 8, 7]
    assert [x for x, _ in toy.trajectory(0, 4, "left", 4)] == [0, 1, 2, 3]  # starts at the wall
    assert [y for _, y in toy.trajectory(3, 2, "up", 6)] == [2, 1, 0, 1, 2, 3]  # up is toward row 0
    assert [y for _, y in toy.trajectory(3, 9, "down", 4)] == [9, 10, 9, 8]
    assert all(x == 3 for x, _ in toy.trajectory(3, 2, "up", 6))  # the other axis never moves
    assert len(toy.trajectory(5, 5, "left", 100)) == 100


def test_render_pixels():
    clip = toy.render("a magenta circle moving down", 2, 7, 3)
    assert clip.shape == (3, 16, 16, 3) and clip.dtype == torch.uint8
    for f, (x, y) in enumerate([(2, 7), (2, 8), (2, 9)]):
        lit = (clip[f] > 0).any(-1)
        box = torch.zeros(16, 16, dtype=torch.bool)
        box[y : y + 6, x : x + 6] = toy.shape_mask("circle")
        assert torch.equal(lit, box)
        assert (clip[f][lit] == torch.tensor([255, 0, 255], dtype=torch.uint8)).all()
    assert clip[0, 0, 0].tolist() == [0, 0, 0]


def test_all_clips_are_the_renders():
    clips = toy.all_clips(5)
    assert clips.shape == (48, 121, 5, 16, 16, 3)
    for i, p in enumerate(toy.PROMPTS):
        for start in (0, 37, 120):  # index = y * 11 + x
            assert torch.equal(clips[i, start], toy.render(p, start % 11, start // 11, 5))


def test_prompts():
    assert len(toy.PROMPTS) == 48 == len(set(toy.PROMPTS))
    assert toy.parse_prompt("a red circle moving left") == ("red", "circle", "left")
    assert "a yellow square moving up" in toy.PROMPTS
    for bad in [
        "a red triangle moving left",
        "red circle moving left",
        "a red circle moving sideways",
        "",
    ]:
        with pytest.raises(ValueError, match="not a toy prompt"):
            toy.parse_prompt(bad)


def test_dataset_batch():
    x, prompts = toy.toy_batch(5, 12, torch.Generator().manual_seed(0))
    assert x.shape == (5, 12, 3, 16, 16) and len(prompts) == 5
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(
        toy.to_uint8(x), toy.to_uint8(toy.to_model_space(toy.to_uint8(x)))
    )  # round trip


def test_score_perfect_noisy_and_wrong():
    p = "a green square moving left"
    clip = toy.render(p, 4, 6, 12)[None]
    s = toy.score_toy(clip, [p])
    assert s["best_fit_psnr"] > 50 and s["prompt_accuracy"] == 1.0
    g = torch.Generator().manual_seed(0)
    psnrs = []
    for sigma in [5, 20, 60]:
        noisy = (
            (clip.float() + sigma * torch.randn(clip.shape, generator=g))
            .clamp(0, 255)
            .round()
            .to(torch.uint8)
        )
        psnrs.append(toy.score_toy(noisy, [p])["best_fit_psnr"])
    assert psnrs[0] > psnrs[1] > psnrs[2]
    wrong = toy.render("a blue square moving left", 4, 6, 12)[None]
    assert toy.score_toy(wrong, [p])["prompt_accuracy"] == 0.0
    assert toy.score_toy(wrong, [p])["errors"] == {
        "colour": 1,
        "shape": 0,
        "axis": 0,
        "direction": 0,
    }
    backwards = toy.render("a green square moving right", 8, 6, 12)[
        None
    ]  # no bounce for 2 frames: not "left"
    assert toy.score_toy(backwards, [p])["errors"] == {
        "colour": 0,
        "shape": 0,
        "axis": 0,
        "direction": 1,
    }
    assert toy.score_toy(clip, [p])["errors"] == {
        "colour": 0,
        "shape": 0,
        "axis": 0,
        "direction": 0,
    }


def test_where_the_psnr_goes(capsys):
    """score_toy's breakdown: the share and mean best-fit PSNR of the samples with the wrong prompt,
    with a pause in the first chunk's steps (prompt right), and clean; clean_frame_psnr: the clean
    samples' PSNR frame by frame against their best fit."""
    p = "a red circle moving right"
    clip = toy.render(p, 2, 3, 12)
    noisy = clip.clone()
    noise = 30 * torch.randn(noisy[5].shape, generator=torch.Generator().manual_seed(0))
    noisy[5] = (noisy[5].float() + noise).clamp(0, 255).round().to(torch.uint8)
    late = torch.cat(
        [clip[:1], clip[:11]]
    )  # frame 0 shown twice: a pause in the first chunk, then the clip
    backwards = toy.render("a red circle moving left", 8, 3, 12)
    backwards = torch.cat([backwards[:1], backwards[:11]])  # and a pause: it counts as wrong, once
    s = toy.score_toy(torch.stack([noisy, late, backwards]), [p] * 3)
    assert s["per_sample_correct"].tolist() == [True, True, False]
    psnr = s["per_sample_psnr"].tolist()
    assert list(s["breakdown"]) == ["wrong prompt", "first-chunk pause", "clean"]
    assert [v for pair in s["breakdown"].values() for v in pair] == pytest.approx(
        [1 / 3, psnr[2], 1 / 3, psnr[1], 1 / 3, psnr[0]]
    )
    frame, exact = (
        s["clean_frame_psnr"],
        10 * math.log10(255**2 / 1e-10),
    )  # (an exact frame's PSNR is capped)
    assert frame[5] == pytest.approx(
        10 * math.log10(255**2 / ((noisy[5].double() - clip[5].double()) ** 2).mean())
    )
    assert 15 < frame[5] < 40 and frame[torch.arange(12) != 5].tolist() == pytest.approx(
        [exact] * 11
    )
    toy.print_scores(torch.stack([noisy, late, backwards]), [p] * 3, 12, True)
    assert (
        f"by sample: wrong prompt 33.3% at {psnr[2]:.2f} dB | "
        f"first-chunk pause 33.3% at {psnr[1]:.2f} dB | "
        f"clean 33.3% at {psnr[0]:.2f} dB; the clean ones frame by frame: "
        in capsys.readouterr().out
    )


def test_diversity():
    p = "a red square moving up"
    same = toy.render(p, 3, 3, 12)[None].repeat(8, 1, 1, 1, 1)
    spread = torch.stack([toy.render(p, x, 0, 12) for x in range(8)])
    expected = 121 * (1 - (120 / 121) ** 8)
    assert toy.score_toy(same, [p] * 8)["diversity"] == pytest.approx(1 / expected)
    assert toy.score_toy(spread, [p] * 8)["diversity"] == pytest.approx(8 / expected)


def test_steady_motion():
    """1 px per frame along the prompt's axis, bounces included, scores 1; a frozen clip, a 2-px
    jump, the wrong axis or a missing object score 0 on the affected steps."""
    for p, x, y in [
        ("a red circle moving right", 8, 2),
        ("a cyan square moving up", 5, 1),
        ("a blue circle moving left", 0, 0),
    ]:
        assert (
            toy.steady_motion(toy.render(p, x, y, 12)[None], [p]).item() == 1.0
        )  # bounces at 10 / 0 included
    p = "a red circle moving right"
    clip = toy.render(p, 2, 3, 12)
    frozen = clip[:1].repeat(12, 1, 1, 1)
    jumps = toy.render(p, 0, 3, 24)[::2][:12]  # 2 px per frame
    assert toy.steady_motion(torch.stack([frozen, jumps]), [p, p]).tolist() == [0.0, 0.0]
    assert (
        toy.steady_motion(clip[None], ["a red circle moving up"]).item() == 0.0
    )  # moves across the axis
    paused = clip.clone()
    paused[6] = clip[5]  # frame 5 shown twice: steps 5->6 (0 px) and 6->7 (2 px) are wrong
    assert toy.steady_motion(paused[None], [p]).item() == pytest.approx(9 / 11)
    blank = clip.clone()
    blank[0] = 0
    assert toy.steady_motion(blank[None], [p]).item() == pytest.approx(10 / 11)
    assert toy.score_toy(clip[None], [p])["steady_motion"] == 1.0
    # where the object is, frame by frame, and how far each step moves it
    pos, seen = toy.object_positions(clip[None], [p])
    assert pos[0].tolist() == [list(c) for c in toy.trajectory(2, 3, "right", 12)] and seen.all()
    assert toy.motion_steps(paused[None], [p])[0].tolist() == [1, 1, 1, 1, 1, 0, 2, 1, 1, 1, 1]
    assert toy.motion_steps(blank[None], [p])[0].tolist() == [-1] + [1] * 10
    shares = toy.score_toy(paused[None], [p])["motion_steps"]
    assert shares == pytest.approx(
        {"pause": 1 / 11, "1 px": 9 / 11, "2+ px": 1 / 11, "off axis / missing": 0}
    )


# ---------------------------------------------------------------------------------------------
# The scripts, end to end (tiny step counts)
# ---------------------------------------------------------------------------------------------


RUN_CONFIG = cv.get_config(
    "tiny", batch_size=2, warmup=1, teacher_train_steps=3, ode_pairs=3, ode_steps=2, dmd_steps=3
)


def test_train_dmd_runs_everything(run_dir):
    for name in ["teacher", "ode", "dmd"]:
        model = utils.load_model(
            str(run_dir / f"{name}.safetensors")
        )  # the checkpoint alone rebuilds it
        assert model.causal == (name != "teacher") and model.cfg == RUN_CONFIG
        enc = toy.read_text_encoder(str(run_dir / f"{name}.safetensors"))
        assert enc(["a red square moving up"]).shape == (1, 32, 64)
    pairs = training.ODEPairs(str(run_dir / "ode_pairs"))
    assert pairs.get(range(3)).shape == (3, 5, 12, 3, 16, 16) and len(pairs.prompts) == 3
    assert (run_dir / "dmd_samples_000002.gif").exists()
    # it ends with its scorecard: the three models' scores, and one GIF of them row by row
    printed = (run_dir / "stdout.txt").read_text()
    table = printed.split("scores of 48 prompts x 1 sample, seed 0")[1].splitlines()[2:5]
    rows = {line[:16].strip(): line[16:].split() for line in table}
    assert list(rows) == ["teacher", "ODE student", "DMD student"]
    for psnr, db, accuracy, steady, pauses in rows.values():
        assert 0 < float(psnr) < 100 and db == "dB"
        assert all(0 <= float(v.rstrip("%")) <= 100 for v in (accuracy, steady, pauses))
    gif = imageio.mimread(run_dir / "scorecard.gif")
    assert len(gif) == 12 and gif[0].shape[:2] == (3 * 130, 8 * 130)  # 3 rows of 8 prompts
    assert f"wrote {run_dir / 'scorecard.gif'}" in printed
    # the students differ from the teacher they were initialised from: they were trained
    t, o = (
        utils.load_model(str(run_dir / "teacher.safetensors")),
        utils.load_model(str(run_dir / "ode.safetensors")),
    )
    changed = [k for k, v in t.state_dict().items() if not torch.equal(v, o.state_dict()[k])]
    assert "head.head.weight" in changed


def test_train_dmd_with_backward_simulation(fresh_run, monkeypatch):
    """--set backward_simulation=true: the generator's inputs come from its own rollout,
    not data."""
    calls, simulate = [], cv.backward_simulation
    monkeypatch.setattr(
        cv, "backward_simulation", lambda *a, **kw: calls.append(a[2].shape) or simulate(*a, **kw)
    )
    train_dmd.main(
        [
            "--tiny",
            "--no-scorecard",
            "--run-dir",
            str(fresh_run),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--set",
            "warmup=1",
            "--set",
            "backward_simulation=true",
            "--sample-every",
            "5",
        ]
    )
    assert len(calls) == 2  # one rollout per iteration, shared by the generator and the critic
    assert utils.load_model(str(fresh_run / "dmd.safetensors")).causal
    meta = utils.load_checkpoint(str(fresh_run / "dmd.safetensors"), keep=lambda k: False)[2]
    assert (
        meta["run_config"]["backward_simulation"] is True
    )  # the DMD run's own settings are on record


def test_sample_writes_npz_and_video(run_dir):
    prompts = ["a red square moving up", "a cyan circle moving left"]
    args = ["--tiny", "--run-dir", str(run_dir), "--num-frames", "6", "--name", "s"]
    for p in prompts:
        args += ["--prompt", p]
    sample.main(args)
    data = np.load(run_dir / "s.npz")
    assert data["frames"].shape == (2, 6, 16, 16, 3) and data["frames"].dtype == np.uint8
    assert list(data["prompts"]) == prompts
    gif = imageio.mimread(run_dir / "s.gif")
    assert len(gif) == 6 and gif[0].shape[:2] == (8 * 16 + 2, 2 * (8 * 16 + 2))
    assert len(imageio.mimread(run_dir / "s.mp4")) == 6


def test_sample_cache_equals_no_cache_and_teacher_runs(run_dir):
    common = [
        "--tiny",
        "--run-dir",
        str(run_dir),
        "--prompt",
        "a blue circle moving right",
        "--seed",
        "3",
    ]
    sample.main(common + ["--name", "cached"])
    sample.main(common + ["--name", "uncached", "--no-cache"])
    a, b = np.load(run_dir / "cached.npz")["frames"], np.load(run_dir / "uncached.npz")["frames"]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # same video up to uint8 rounding
    score = sample.main(common + ["--name", "teacher", "--teacher"])
    assert np.load(run_dir / "teacher.npz")["frames"].shape == (1, 12, 16, 16, 3)
    assert 0.0 <= score["prompt_accuracy"] <= 1.0


def test_sample_set_changes_sampling_not_the_network(run_dir, monkeypatch):
    """--set reaches the sampler (the checkpoint's config is the base),
    but cannot reshape the network."""
    calls, ode = [], cv.sample_ode
    monkeypatch.setattr(
        cv,
        "sample_ode",
        lambda *a, **kw: calls.append((kw["guidance"], kw["steps"], kw["shift"])) or ode(*a, **kw),
    )
    common = [
        "--tiny",
        "--run-dir",
        str(run_dir),
        "--prompt",
        "a blue circle moving right",
        "--teacher",
        "--name",
        "t",
    ]
    sample.main(common)
    sample.main(common + ["--set", "teacher_steps=30", "--set", "teacher_guidance=4.5"])
    assert calls == [(3.0, 24, 3.0), (4.5, 30, 3.0)]  # (guidance, steps, shift)
    with pytest.raises(
        cv.CausVidError, match="--set dim: the network's shape comes from the checkpoint"
    ):
        sample.main(common + ["--set", "dim=64"])
    with pytest.raises(
        cv.CausVidError, match="must index the teacher's 3-step schedule"
    ):  # the student's steps index it
        sample.main(common[:5] + ["--set", "teacher_steps=3"])


def test_sample_rejects_bad_frame_counts(run_dir):
    with pytest.raises(cv.CausVidError, match="multiple of the chunk size"):
        sample.main(
            [
                "--tiny",
                "--run-dir",
                str(run_dir),
                "--num-frames",
                "7",
                "--prompt",
                "a red square moving up",
            ]
        )


def test_train_ode_reuses_teacher_and_pairs(run_dir, capsys):
    pairs = run_dir / "ode_pairs"
    shard = pairs / "pairs_000000.safetensors"
    before = (shard.stat().st_mtime_ns, (run_dir / "teacher.safetensors").stat().st_mtime_ns)
    train_ode.main(
        ["--tiny", "--run-dir", str(run_dir), "--steps", "1", "--pairs", "2", "--batch-size", "2"]
    )
    after = (shard.stat().st_mtime_ns, (run_dir / "teacher.safetensors").stat().st_mtime_ns)
    assert before == after  # neither the teacher nor the pairs were made again
    assert f"ODE pairs: {pairs} (2 of 3)" in capsys.readouterr().out


def toy_embeddings(dim=6):
    g = torch.Generator().manual_seed(0)
    return {p: torch.randn(3, dim, generator=g) for p in toy.PROMPTS + [""]}


def test_exact_toy_denoiser_is_the_posterior_mean():
    """Bayes over every clip, computed the slow way -- x_t = (1 - s) X + s eps per frame, each frame
    at its own t -- for conditional and unconditional rows in one batch."""
    emb, Fr = toy_embeddings(), 6
    den = toy.ExactToyDenoiser(emb)
    prompts = ["a red circle moving up", "", "a blue square moving left"]
    g = torch.Generator().manual_seed(1)
    x0 = toy.to_model_space(
        torch.stack(
            [
                toy.render(prompts[0], 3, 4, Fr),
                toy.render("a cyan circle moving down", 0, 9, Fr),
                toy.render(prompts[2], 10, 2, Fr),
            ]
        )
    ).double()
    t = torch.tensor([[900.0] * 3 + [400.0] * 3, [700.0] * Fr, [990.0] * 3 + [80.0] * 3])
    x_t = cv.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
    v = den(x_t, t, torch.stack([emb[p] for p in prompts]))
    X = toy.to_model_space(toy.all_clips(Fr)).double()  # (48, 121, F, 3, 16, 16)
    for b, p in enumerate(prompts):
        cand = X.flatten(0, 1) if p == "" else X[toy.PROMPTS.index(p)]
        s = (t[b] / 1000).double()[None, :, None, None, None]
        logp = (-(x_t[b][None] - (1 - s) * cand).pow(2) / (2 * s**2)).flatten(2).sum(2).sum(1)
        x0_hat = (logp.softmax(0)[:, None, None, None, None] * cand).sum(0)
        torch.testing.assert_close(
            cv.velocity_to_x0(x_t[b : b + 1], v[b : b + 1], t[b : b + 1])[0], x0_hat
        )
    # at low noise the posterior is the clip itself; the wrong prompt cannot reach it
    t_low = torch.full((1, Fr), 50.0)
    x_low = cv.add_noise(x0[:1], torch.randn(x0[:1].shape, generator=g, dtype=torch.float64), t_low)
    torch.testing.assert_close(
        cv.velocity_to_x0(x_low, den(x_low, t_low, emb[prompts[0]][None]), t_low), x0[:1]
    )
    with pytest.raises(cv.CausVidError, match="none of the toy prompts"):
        den(x_t[:1], t[:1], torch.randn(1, 3, 6))
    with pytest.raises(cv.CausVidError, match="toy world only"):
        wan.WanWorld(cv.get_config("wan2.1-t2v-1.3b")).exact_teacher(None)


def test_exact_toy_denoiser_samples_the_world():
    """Its ODE samples (24 Euler steps, with and without CFG) are clips of the world:
    the right prompt, every frame step exactly 1 px."""
    emb = toy_embeddings()
    prompts = [
        "a green square moving right",
        "a yellow circle moving down",
        "a magenta circle moving left",
    ]
    text = torch.stack([emb[p] for p in prompts])
    noise = torch.randn(3, 6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    for guidance in (1.0, 3.0):
        x, _ = cv.sample_ode(
            toy.ExactToyDenoiser(emb), noise, text, emb[""][None], guidance, 24, 3.0
        )
        score = toy.score_toy(toy.to_uint8(x), prompts)
        assert (
            score["best_fit_psnr"] > 50
            and score["prompt_accuracy"] == 1.0
            and score["steady_motion"] == 1.0
        )


def test_exact_teacher_runs_both_stages(fresh_run):
    """--exact-teacher: the ODE pairs are the exact denoiser's samples (clips of the world),
    DMD's real score is the exact denoiser, and the trained teacher still initialises the models."""
    args = [
        "--tiny",
        "--run-dir",
        str(fresh_run),
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--set",
        "warmup=1",
    ]
    with pytest.raises(
        cv.CausVidError, match="pairs of the trained teacher"
    ):  # they are not reused
        train_ode.main(args + ["--steps", "1", "--pairs", "2", "--exact-teacher"])
    shutil.rmtree(fresh_run / "ode_pairs")
    train_ode.main(args + ["--steps", "1", "--pairs", "2", "--exact-teacher"])
    pairs = training.ODEPairs(str(fresh_run / "ode_pairs"))
    assert pairs.teachers == {"exact"}
    score = toy.score_toy(toy.to_uint8(pairs.get(range(2), state=-1)), pairs.prompts)
    assert score["best_fit_psnr"] > 50 and score["prompt_accuracy"] == 1.0
    train_dmd.main(
        args + ["--no-scorecard", "--steps", "2", "--sample-every", "5", "--exact-teacher"]
    )
    meta = utils.load_checkpoint(str(fresh_run / "dmd.safetensors"), keep=lambda k: False)[2]
    assert meta["exact_teacher"] is True
    sample.main(
        [
            "--tiny",
            "--run-dir",
            str(fresh_run),
            "--teacher",
            "--exact-teacher",
            "--num-frames",
            "6",
            "--prompt",
            "a red square moving up",
            "--name",
            "exact",
        ]
    )
    data = np.load(fresh_run / "exact.npz")
    assert (
        toy.score_toy(torch.from_numpy(data["frames"]), list(data["prompts"]))["best_fit_psnr"] > 50
    )


def test_sample_reads_the_run_and_writes_to_out(run_dir, tmp_path):
    """The model comes from --run-dir (or --ckpt), the samples go to --out:
    one flag does not do both."""
    out = tmp_path / "samples"
    sample.main(
        [
            "--tiny",
            "--run-dir",
            str(run_dir),
            "--out",
            str(out),
            "--prompt",
            "a red square moving up",
            "--num-frames",
            "3",
            "--name",
            "elsewhere",
        ]
    )
    assert (out / "elsewhere.npz").exists() and not (run_dir / "elsewhere.npz").exists()


def test_ode_pairs_take_every_stride_th_teacher_step_and_keep_the_students_timesteps():
    """ode_pair_stride: the pairs' teacher runs teacher_steps / stride Euler steps and keeps the
    states at the student's timesteps exactly; a stride that does not divide is refused."""
    cfg = cv.get_config("tiny")  # 24 teacher steps, student indices (0, 6, 12, 18), stride 2
    steps, keep = train_ode.pair_schedule(cfg)
    assert (steps, keep) == (12, [0, 3, 6, 9])
    kept_t = cv.sampling_schedule(steps, cfg.shift)[keep].float()
    torch.testing.assert_close(kept_t, cv.student_timesteps(cfg), rtol=0, atol=1e-3)
    wan = cv.get_config("wan2.1-t2v-1.3b")  # stride 1: the official 50 steps, indices [0, 36, 44]
    assert train_ode.pair_schedule(wan) == (50, [0, 36, 44])
    for bad in [dict(ode_pair_stride=5), dict(student_step_indices=(0, 7, 12, 18))]:
        with pytest.raises(cv.CausVidError, match="ode_pair_stride"):
            train_ode.pair_schedule(cv.get_config("tiny", **bad))


def test_pairs_of_another_stride_are_not_reused(fresh_run):
    """A run's pairs were made with 12 Euler steps (stride 2); a run at stride 1 says so in one
    line and writes nothing, rather than mixing or silently reusing them."""
    before = sorted(os.listdir(fresh_run / "ode_pairs"))
    assert training.ODEPairs(str(fresh_run / "ode_pairs")).euler_steps == {12}
    out = one_process(
        "train_ode.py",
        ["--tiny", "--run-dir", str(fresh_run), "--pairs", "4", "--set", "ode_pair_stride=1"],
        rc=2,
    )
    assert "holds pairs made with 12 Euler steps, this run makes them with 24" in out
    assert sorted(os.listdir(fresh_run / "ode_pairs")) == before


def test_bench_profile_splits_each_phase_by_kind_of_work():
    """bench.py --profile: a row per phase with its steps per run and shares that add up to the
    step's wall time (rounding aside), then the work outside the DiT."""
    import bench

    lines = bench.main(["--tiny", "--profile", "--repeats", "1", "--set", "batch_size=2"])
    rows = [line.split(" | ") for line in lines[2:6]]
    assert [r[2].split(" = ")[0] for r in rows] == ["96", "300", "60", "240"]  # tiny's defaults
    for r in rows:
        shares = [float(c.strip(" |%")) for c in r[3:]]
        assert len(shares) == 6 and 96 <= sum(shares) <= 104, r
    assert [line.split(":")[0] for line in lines[6:]] == [
        "render a batch of toy clips (DMD's videos)",
        "embed the 48 prompts (once per stage)",
        "write a checkpoint (once per stage)",
    ]


def test_ode_pairs_are_written_in_shards_resumed_and_read_lazily(fresh_run, tmp_path, monkeypatch):
    """Shard by shard, each shard's noise from the seed and its index: a run killed after one shard
    resumes into exactly the pairs of a run never stopped; reading takes only the rows and states
    asked for, never a whole shard."""
    import argparse

    import safetensors

    cfg = cv.get_config("tiny", ode_pairs=5, teacher_steps=6, student_step_indices=(0, 2, 4))
    teacher, enc = (
        utils.load_model(str(fresh_run / "teacher.safetensors")),
        toy.read_text_encoder(str(fresh_run / "teacher.safetensors")),
    )
    args = argparse.Namespace(prompts=None, exact_teacher=False, seed=3)
    world = toy.ToyWorld(cfg, torch.device("cpu"))
    world.pairs_batch = 2  # shards of 2 pairs
    train_ode.make_ode_pairs(args, world, teacher, enc, str(tmp_path / "straight"))
    real_save, saves = utils.save_checkpoint, []

    def dies_on_the_second(*a, **kw):
        saves.append(a[0])
        if len(saves) == 2:
            raise KeyboardInterrupt
        real_save(*a, **kw)

    monkeypatch.setattr(utils, "save_checkpoint", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        train_ode.make_ode_pairs(args, world, teacher, enc, str(tmp_path / "resumed"))
    monkeypatch.undo()
    assert len(training.ODEPairs(str(tmp_path / "resumed"))) == 2  # one shard survived
    train_ode.make_ode_pairs(args, world, teacher, enc, str(tmp_path / "resumed"))
    a, b = (
        training.ODEPairs(str(tmp_path / "straight")),
        training.ODEPairs(str(tmp_path / "resumed")),
    )
    assert len(a) == len(b) == 5 and a.prompts == b.prompts
    assert torch.equal(a.get(range(5)), b.get(range(5))) and a.get(range(5)).shape == (
        5,
        4,
        12,
        3,
        16,
        16,
    )

    reads, real_open = [], safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kw):
            self.f = real_open(*args, **kw)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_slice(self, name):
            sl = self.f.__enter__().get_slice(name)
            return type("S", (), {"__getitem__": lambda _, key: reads.append(key) or sl[key]})()

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    ends = a.get([4, 1], state=-1)
    assert reads == [(0, -1), (1, -1)] and ends.shape == (
        2,
        12,
        3,
        16,
        16,
    )  # row 4 is shard 2's first
    assert torch.equal(ends, b.get([4, 1])[:, -1])


def test_causal_ode_init_makes_its_pairs_with_the_causal_sampler(fresh_run):
    """--set causal_ode_init=true (Causal Forcing): a causal diffusion model is fine-tuned from the
    teacher (--causal-teacher-steps: in the run, by teacher forcing), its own chunk-by-chunk sampler
    makes the ODE pairs, and the student starts from its weights; pairs of the bidirectional teacher
    are not reused."""
    args = [
        "--tiny",
        "--run-dir",
        str(fresh_run),
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--set",
        "warmup=1",
        "--steps",
        "1",
        "--pairs",
        "2",
        "--set",
        "causal_ode_init=true",
        "--causal-teacher-steps",
        "2",
    ]
    with pytest.raises(cv.CausVidError, match="pairs of the trained teacher"):
        train_ode.main(args)
    shutil.rmtree(fresh_run / "ode_pairs")
    train_ode.main(args)
    causal = utils.load_model(str(fresh_run / "causal_diffusion.safetensors"))
    teacher = utils.load_model(str(fresh_run / "teacher.safetensors"))
    assert causal.causal and not torch.equal(
        causal.head.head.weight, teacher.head.head.weight
    )  # fine-tuned
    pairs = training.ODEPairs(str(fresh_run / "ode_pairs"))
    assert pairs.teachers == {"causal"}
    cfg, enc = pairs.cfg, toy.read_text_encoder(str(fresh_run / "teacher.safetensors"))
    emb = enc.embed(pairs.prompts + [""])
    noise = torch.randn(
        2, 12, 3, 16, 16, generator=torch.Generator().manual_seed(0)
    )  # shard 0 of seed 0
    steps, keep = train_ode.pair_schedule(cfg)  # every ode_pair_stride-th teacher step
    with utils.autocast(torch.device("cpu"), training=True):  # as training data is made
        _, expected = cv.sample_ode_causal(
            causal,
            noise,
            utils.stack_text(emb, pairs.prompts, "cpu"),
            emb[""][None],
            cfg.teacher_guidance,
            steps,
            cfg.shift,
            keep=keep,
        )
    assert torch.equal(
        pairs.get(range(2)), expected
    )  # the pairs are the causal sampler's trajectories


def test_dmd_shift_critic_warmup_and_the_log(fresh_run, monkeypatch):
    """--set dmd_shift=1 reaches DMD's t alone (the generator's steps stay the schedule's); --set
    critic_warmup=3 runs 3 critic-only iterations before the first generator update, which leave the
    generator where stage 1 left it; every log line, diagnostics included, goes to dmd_log.jsonl;
    --checkpoint-every keeps the generator along the way."""
    shifts, steps, dmd_calls = [], [], []
    dmd_t, make, loss = cv.dmd_timesteps, cv.generator_x0, cv.dmd_loss
    monkeypatch.setattr(
        cv, "dmd_timesteps", lambda B, F, shift, *a: shifts.append(shift) or dmd_t(B, F, shift, *a)
    )
    monkeypatch.setattr(
        cv, "generator_x0", lambda g, x, text, ts, *a: steps.append(ts) or make(g, x, text, ts, *a)
    )
    monkeypatch.setattr(cv, "dmd_loss", lambda *a: dmd_calls.append(len(shifts)) or loss(*a))
    train_dmd.main(
        [
            "--tiny",
            "--no-scorecard",
            "--run-dir",
            str(fresh_run),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--set",
            "dmd_shift=1",
            "--set",
            "critic_warmup=3",
            "--log-every",
            "1",
            "--sample-every",
            "100",
            "--checkpoint-every",
            "2",
        ]
    )
    assert shifts == [1.0] * 6  # 5 critic updates and 1 generator update, all at DMD's own shift
    assert (
        all(torch.equal(ts, cv.student_timesteps(cv.get_config("tiny"))) for ts in steps)
        and len(steps) == 5
    )
    assert dmd_calls == [
        4
    ]  # the generator learns first at iteration 4 (3 warm-up + 1), once in 2 (ratio 5)
    rows = [json.loads(line) for line in (fresh_run / "dmd_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert (
        all(r["distance"] == 0 for r in rows[:3]) and rows[3]["distance"] > 0
    )  # the warm-up trains the critic alone
    for key in [
        "critic_fm",
        "teacher_fm",
        "dmd",
        "gen_grad",
        "grad_chunk0",
        "grad_chunk3",
        "grad_clean",
    ]:
        assert key in rows[3] and key not in rows[0], key
    assert all("critic" in r for r in rows)
    kept = sorted(
        p.name for p in fresh_run.glob("dmd_0*.safetensors")
    )  # --checkpoint-every 2: a length curve
    assert kept == ["dmd_000002.safetensors", "dmd_000004.safetensors"]
    assert utils.load_checkpoint(str(fresh_run / kept[1]), keep=lambda k: False)[2]["steps"] == 4


def test_self_forcings_optimiser_and_ema(fresh_run, monkeypatch):
    """Self-Forcing's recipe as settings: --set dmd_beta1=0 reaches both optimisers;
    --set generator_ema=0.5 --set generator_ema_start=3 saves the EMA of the generator updates from
    iteration 3 on, started from the weights of the update before it:
    here 0.5 (after update 1) + 0.5 (after update 2)."""
    betas, adamw = [], training.adamw
    monkeypatch.setattr(
        training,
        "adamw",
        lambda params, lr, device, b: betas.append(b) or adamw(params, lr, device, b),
    )
    args = [
        "--tiny",
        "--no-scorecard",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--sample-every",
        "100",
        "--ode",
        str(fresh_run / "ode.safetensors"),
        "--set",
        "dmd_beta1=0",
    ]
    weights = {}
    for name, extra in [
        ("one", ["--steps", "1"]),
        ("two", ["--steps", "6"]),
        ("ema", ["--steps", "6", "--set", "generator_ema=0.5", "--set", "generator_ema_start=3"]),
    ]:
        train_dmd.main(args + ["--run-dir", str(fresh_run / name)] + extra)
        weights[name] = utils.load_model(str(fresh_run / name / "dmd.safetensors")).state_dict()
    assert betas == [(0.0, 0.999)] * 6
    for key, w in weights[
        "ema"
    ].items():  # generator updates at iterations 0 and 5 (critic ratio 5)
        assert torch.allclose(w, 0.5 * (weights["one"][key] + weights["two"][key]), atol=1e-6), key
    assert not torch.equal(weights["one"]["head.head.weight"], weights["two"]["head.head.weight"])


def test_train_dmd_with_self_forcing(fresh_run, monkeypatch):
    """--set self_forcing=true: every iteration rolls the student out from noise, with gradient in
    the generator's turns only; it cannot be combined with backward simulation."""
    calls, rollout = [], successors.self_forcing_rollout
    monkeypatch.setattr(
        successors,
        "self_forcing_rollout",
        lambda *a, **kw: calls.append(torch.is_grad_enabled()) or rollout(*a, **kw),
    )
    args = [
        "--tiny",
        "--no-scorecard",
        "--run-dir",
        str(fresh_run),
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--sample-every",
        "100",
    ]
    train_dmd.main(args + ["--steps", "6", "--set", "self_forcing=true"])
    assert calls == [True, False, False, False, False, True]  # critic ratio 5
    assert utils.load_checkpoint(str(fresh_run / "dmd.safetensors"), keep=lambda k: False)[2][
        "run_config"
    ]["self_forcing"]
    with pytest.raises(cv.CausVidError, match="set one"):
        train_dmd.main(args + ["--set", "self_forcing=true", "--set", "backward_simulation=true"])


SHIPPED_PROMPTS = toy.PROMPTS[::6]  # 8 prompts: both shapes, every colour and direction


def test_the_shipped_teacher_loads_and_scores(tmp_path):
    """weights/toy_teacher.safetensors (its provenance: weights/README.md) is what sample.py
    --teacher and both training stages use when a run has no teacher of its own,
    and it is a good teacher."""
    _, cfg, meta = utils.load_checkpoint(toy.ToyWorld.pretrained_teacher, keep=lambda k: False)
    tiny = cv.get_config("tiny")
    assert meta["stage"] == "teacher" and meta["steps"] == tiny.teacher_train_steps
    # the toy preset's architecture, clip shape and sampling schedule
    # (training settings may move on)
    for name in sample.ARCHITECTURE + (
        "height",
        "width",
        "num_frames",
        "chunk_size",
        "shift",
        "teacher_steps",
        "teacher_guidance",
    ):
        assert getattr(cfg, name) == getattr(tiny, name), name
    args = ["--tiny", "--run-dir", str(tmp_path), "--teacher", "--seed", "0", "--name", "t"]
    score = sample.main(args + [x for p in SHIPPED_PROMPTS for x in ("--prompt", p)])
    assert not (tmp_path / "teacher.safetensors").exists()
    assert (
        score["prompt_accuracy"] >= 7 / 8
        and score["best_fit_psnr"] > 30
        and score["steady_motion"] > 0.85
    )


def test_the_shipped_student_loads_and_scores(tmp_path):
    """weights/toy_student.safetensors (weights/README.md: the best recipe's student, 33.30 dB over
    48 prompts x 4), which demo.py streams by default, is a causal DMD student of the toy preset
    and a good one: 8 prompts here score 35.9 dB, 8/8 and 98% steady on the machine it was made
    on; the floors leave several dB and a prompt of room for another CPU's rounding."""
    path = toy.ToyWorld.pretrained_student
    _, cfg, meta = utils.load_checkpoint(path, keep=lambda k: False)
    assert meta["stage"] == "dmd" and meta["causal"] and meta["run_config"]["self_forcing"]
    tiny = cv.get_config("tiny")
    for name in sample.ARCHITECTURE + ("height", "width", "num_frames", "chunk_size"):
        assert getattr(cfg, name) == getattr(tiny, name), name
    args = ["--tiny", "--run-dir", str(tmp_path), "--ckpt", path, "--seed", "0", "--name", "s"]
    score = sample.main(args + [x for p in SHIPPED_PROMPTS for x in ("--prompt", p)])
    assert score["prompt_accuracy"] >= 7 / 8 and score["best_fit_psnr"] > 30
    assert score["steady_motion"] > 0.85


def test_training_starts_from_the_shipped_teacher(tmp_path, capsys):
    """A fresh --tiny run makes its ODE pairs with the shipped teacher (no pre-training);
    --teacher-steps N asks for a teacher of its own."""
    args = [
        "--tiny",
        "--run-dir",
        str(tmp_path),
        "--batch-size",
        "2",
        "--pairs",
        "2",
        "--steps",
        "1",
        "--set",
        "warmup=1",
    ]
    train_ode.main(args)
    assert f"teacher: {toy.ToyWorld.pretrained_teacher}" in capsys.readouterr().out
    assert (
        not (tmp_path / "teacher.safetensors").exists() and (tmp_path / "ode.safetensors").exists()
    )
    own = tmp_path / "own"
    train_ode.main(args[:2] + [str(own)] + args[3:] + ["--teacher-steps", "2"])
    assert (
        "pre-training the toy teacher" in capsys.readouterr().out
        and (own / "teacher.safetensors").exists()
    )


CAUSAL_FLOOR = (
    5 / 8,
    28.0,
    0.85,
)  # accuracy, best-fit PSNR, steady motion; the file: 6/8, 35.3 dB, 96.6% (weights/README.md)


def test_the_shipped_causal_teacher_loads_and_scores(tmp_path):
    """weights/toy_causal_teacher.safetensors (weights/README.md) is causal_ode_init's teacher when
    a run has none: the shipped teacher fine-tuned with the block mask by teacher forcing. Sampled
    chunk by chunk over its KV cache (sample.py --teacher --ckpt), it is a good causal teacher."""
    _, cfg, meta = utils.load_checkpoint(
        toy.ToyWorld.pretrained_causal_teacher, keep=lambda k: False
    )
    assert (
        meta["causal"]
        and meta["stage"] == "causal teacher"
        and meta["steps"] == cv.get_config("tiny").causal_teacher_steps
    )
    args = [
        "--tiny",
        "--run-dir",
        str(tmp_path),
        "--teacher",
        "--ckpt",
        toy.ToyWorld.pretrained_causal_teacher,
        "--seed",
        "0",
    ]
    score = sample.main(args + [x for p in SHIPPED_PROMPTS for x in ("--prompt", p)])
    assert (
        score["prompt_accuracy"] >= CAUSAL_FLOOR[0]
        and score["best_fit_psnr"] > CAUSAL_FLOOR[1]
        and score["steady_motion"] > CAUSAL_FLOOR[2]
    ), score


def test_causal_ode_init_starts_from_the_shipped_causal_teacher(tmp_path, capsys):
    """--set causal_ode_init=true in a fresh run makes its pairs with the shipped causal teacher (no
    training); --causal-teacher-steps N trains one into the run instead (test above)."""
    assert os.path.isfile(
        toy.ToyWorld.pretrained_causal_teacher
    )  # (else this run would train one for 10000 steps)
    train_ode.main(
        [
            "--tiny",
            "--run-dir",
            str(tmp_path),
            "--batch-size",
            "2",
            "--pairs",
            "2",
            "--steps",
            "1",
            "--set",
            "causal_ode_init=true",
        ]
    )
    assert f"causal teacher: {toy.ToyWorld.pretrained_causal_teacher}" in capsys.readouterr().out
    assert not (tmp_path / "causal_diffusion.safetensors").exists()
    assert training.ODEPairs(str(tmp_path / "ode_pairs")).teachers == {"causal"}


def test_causal_forcings_recipe_is_one_flag(tmp_path):
    """--recipe causal-forcing (the README's first table) is Causal Forcing's recipe over the preset
    -- causal ODE init from the shipped causal teacher, then Self-Forcing's DMD with its optimiser
    and EMA at the toy world's measured rates and length (Wan: Causal Forcing's own) -- and the
    flags and --set still override it. Typed as a user types it, in a subprocess."""

    def resolve(*argv):
        return utils.resolve(train_dmd.parse_args(list(argv)))[0]

    cfg = resolve("--tiny", "--recipe", "causal-forcing")
    assert (
        cfg.causal_ode_init,
        cfg.self_forcing,
        cfg.dmd_beta1,
        cfg.generator_ema,
        cfg.generator_ema_start,
        cfg.lr_generator,
        cfg.lr_critic,
        cfg.dmd_steps,
    ) == (True, True, 0.0, 0.99, 200, 2e-4, 4e-5, 800)
    assert cfg == cv.get_config(
        "tiny", **successors.RECIPES["causal-forcing"]["tiny"]
    )  # nothing else changes
    wan_cfg = resolve("--config", "wan2.1-t2v-1.3b", "--recipe", "causal-forcing")
    assert (wan_cfg.self_forcing, wan_cfg.lr_generator, wan_cfg.lr_critic, wan_cfg.dmd_steps) == (
        True,
        2e-6,
        4e-7,
        6000,
    )
    over = resolve(
        "--tiny", "--recipe", "causal-forcing", "--steps", "7", "--set", "lr_critic=1e-5"
    )
    assert (over.dmd_steps, over.lr_critic, over.lr_generator) == (7, 1e-5, 2e-4)
    assert resolve("--tiny") == cv.get_config("tiny")  # CausVid stays the default
    out = one_process(
        "train_dmd.py",
        [
            "--tiny",
            "--no-scorecard",
            "--recipe",
            "causal-forcing",
            "--run-dir",
            str(tmp_path),
            "--batch-size",
            "2",
            "--pairs",
            "2",
            "--ode-steps",
            "1",
            "--steps",
            "2",
            "--set",
            "warmup=1",
            "--sample-every",
            "100",
            "--device",
            "cpu",
        ],
    )
    assert f"causal teacher: {toy.ToyWorld.pretrained_causal_teacher}" in out
    assert training.ODEPairs(str(tmp_path / "ode_pairs")).teachers == {"causal"}
    ran = utils.load_checkpoint(str(tmp_path / "dmd.safetensors"), keep=lambda k: False)[2][
        "run_config"
    ]
    assert {k: ran[k] for k in successors.RECIPES["causal-forcing"]["tiny"]} == {
        **successors.RECIPES["causal-forcing"]["tiny"],
        "dmd_steps": 2,  # (the flags' own)
        "ode_steps": 1,
    }


def test_diagonal_recipe_is_one_flag(tmp_path):
    """--recipe diagonal (the README's first table): the causal ODE init at lr_ode 3e-5, the rollout
    for 736 iterations and chunk 0 in 8 steps, over the toy preset; typed in a subprocess, its run
    trains and samples chunk 0 so; Wan, where it was never measured, is refused in one line."""
    cfg = utils.resolve(train_dmd.parse_args(["--tiny", "--recipe", "diagonal"]))[0]
    assert cfg == cv.get_config("tiny", **successors.RECIPES["diagonal"]["tiny"])
    assert (cfg.causal_ode_init, cfg.self_forcing, cfg.lr_ode, cfg.dmd_steps) == (
        True,
        True,
        3e-5,
        736,
    )
    assert len(cfg.first_chunk_step_indices) == 2 * len(cfg.student_step_indices)
    assert set(cfg.student_step_indices) <= set(cfg.first_chunk_step_indices)
    run = ["--tiny", "--no-scorecard", "--recipe", "diagonal", "--run-dir", str(tmp_path)]
    small = ["--batch-size", "2", "--pairs", "2", "--ode-steps", "1", "--steps", "1"]
    one_process("train_dmd.py", run + small + ["--sample-every", "100", "--device", "cpu"])
    _, ran, _ = utils.load_checkpoint(str(tmp_path / "dmd.safetensors"), keep=lambda k: False)
    assert ran.first_chunk_step_indices == cfg.first_chunk_step_indices
    wan_run = ["--config", "wan2.1-t2v-1.3b", "--recipe", "diagonal", "--run-dir", str(tmp_path)]
    err = one_process("train_dmd.py", wan_run, rc=2).strip().splitlines()
    assert err[-1].startswith("error: --recipe diagonal is measured on the toy world only")


def test_sample_first_chunk_teacher_is_the_causal_teachers_chunk_0_then_the_student(tmp_path):
    """`sample.py --first-chunk-teacher` (the bound, typed in a subprocess): chunk 0 of every video
    is, to the bit, what the causal teacher's own sampler makes of the same noise (`--teacher
    --ckpt` it); the chunks after it are the student's, over it; --video is refused in one line."""
    prompts = [x for p in SHIPPED_PROMPTS[:3] for x in ("--prompt", p)]
    common = ["--tiny", "--run-dir", str(tmp_path), "--seed", "5", *prompts]
    student = toy.ToyWorld.pretrained_student
    out = one_process(
        "sample.py", common + ["--ckpt", student, "--first-chunk-teacher", "--name", "bound"]
    )
    assert f"first chunk: {toy.ToyWorld.pretrained_causal_teacher} (24 Euler steps, CFG 3.0)" in out
    one_process("sample.py", common + ["--ckpt", student, "--name", "plain"])
    causal = toy.ToyWorld.pretrained_causal_teacher
    one_process("sample.py", common + ["--teacher", "--ckpt", causal, "--name", "causal"])
    bound, plain, teacher = (
        np.load(tmp_path / f"{n}.npz")["frames"] for n in ("bound", "plain", "causal")
    )
    assert np.array_equal(bound[:, :3], teacher[:, :3])
    assert not np.array_equal(bound[:, :3], plain[:, :3])
    assert not np.array_equal(bound[:, 3:], teacher[:, 3:])  # the student's, not the teacher's
    err = one_process(
        "sample.py",
        common + ["--ckpt", student, "--first-chunk-teacher", "--video", "x.npz"],
        rc=2,
    )
    assert "--first-chunk-teacher makes chunk 0" in err.strip().splitlines()[-1]


def test_consistency_init_is_stage_1_without_pairs_and_the_first_chunks_steps_are_kept(
    tmp_path, capsys
):
    """--set consistency_init=true: stage 1 distils the shipped causal teacher by consistency (no
    ODE pairs are made) and saves its target network, an EMA of the student, not the student; a
    DMD run with first_chunk_step_indices and the rollout saves them in its student's config, so
    that the student samples chunk 0 as it was trained."""
    base = ["--tiny", "--run-dir", str(tmp_path), "--batch-size", "2", "--device", "cpu"]
    train_ode.main(base + ["--steps", "3", "--set", "consistency_init=true", "--log-every", "1"])
    out = capsys.readouterr().out
    assert "consistency step 3/3" in out and "causal teacher:" in out
    assert not (tmp_path / "ode_pairs").exists()
    init = utils.load_model(str(tmp_path / "ode.safetensors"))
    teacher = utils.load_model(toy.ToyWorld.pretrained_causal_teacher)
    moved = max((a - b).abs().max() for a, b in zip(init.parameters(), teacher.parameters()))
    # Adam (beta1 0) moves the student's weights by about lr_ode a step (by exactly lr_ode at the
    # first), at most sqrt(n) lr_ode at the n-th; the EMA (0.99) follows 1% of the way each step,
    # so it has moved under 0.01 (1 + 2.42 + 4.15) lr_ode < 0.1 lr_ode, the student about 3 lr_ode
    assert 0 < moved < 0.1 * cv.get_config("tiny").lr_ode
    first = "first_chunk_step_indices=0,3,6,9,12,15,18,21"
    flags = ["--steps", "1", "--no-scorecard", "--sample-every", "100"]
    train_dmd.main(base + flags + ["--set", "self_forcing=true", "--set", first])
    _, cfg, _ = utils.load_checkpoint(str(tmp_path / "dmd.safetensors"), keep=lambda k: False)
    assert cfg.first_chunk_step_indices == (0, 3, 6, 9, 12, 15, 18, 21)
