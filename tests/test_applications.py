"""Sec. 5.3-5.4 through sample.py: image-to-video, video-to-video, dynamic prompting,
long videos (their quality is measured by study.py on a trained model; here: that each mode does
what it says)."""

import importlib.util

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

import causvid as cv
import sample
import toy_world as toy
import training
import utils

P = "a green circle moving right"


def run(run_dir, *extra):
    return sample.main(
        ["--tiny", "--run-dir", str(run_dir), "--device", "cpu", "--name", "app", *extra]
    )


def frames_of(run_dir):
    return np.load(run_dir / "app.npz")["frames"]


def test_window_psnr_of_a_long_true_clip_is_perfect():
    clip = toy.render(P, 7, 3, 48)[None]  # bounces off the right wall at frame 3, then moves left
    w = toy.window_psnr(clip, [P])
    assert w.shape == (1, 4) and (w > 50).all()
    wrong_axis = toy.window_psnr(clip, ["a green circle moving up"])
    assert (wrong_axis < 30).all()


def test_image_to_video(run_dir, tmp_path, capsys):
    image = toy.render(P, 2, 5, 1)[0].numpy()
    imageio.imwrite(
        tmp_path / "first.png", np.kron(image, np.ones((2, 2, 1), dtype=np.uint8))
    )  # 32x32
    run(run_dir, "--image", str(tmp_path / "first.png"), "--prompt", P, "--num-frames", "6")
    assert "resized" in capsys.readouterr().out  # 32x32 -> 16x16, with a message
    out = frames_of(run_dir)
    assert out.shape == (1, 3 + 6, 16, 16, 3)  # the given chunk, then 6 generated frames
    assert all(np.array_equal(out[0, f], image) for f in range(3))


def test_image_with_the_wrong_channels_is_refused(run_dir, tmp_path):
    imageio.imwrite(tmp_path / "grey.png", np.zeros((16, 16), dtype=np.uint8))
    with pytest.raises(cv.CausVidError, match="has 1 channel.* give an RGB"):
        run(run_dir, "--image", str(tmp_path / "grey.png"), "--prompt", P)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(cv.CausVidError, match="cannot read"):
        run(run_dir, "--image", str(tmp_path / "bad.png"), "--prompt", P)


def test_video_to_video_from_an_npz(run_dir, tmp_path, capsys):
    clips = torch.stack(
        [
            toy.render("a red square moving down", 4, 1, 12),
            toy.render("a red square moving left", 9, 2, 12),
        ]
    )
    np.savez(tmp_path / "in.npz", frames=clips.numpy(), prompts=np.array(["x", "y"]))
    run(
        run_dir,
        "--video",
        str(tmp_path / "in.npz"),
        "--prompt",
        "a blue square moving down",
        "--strength",
        "0.8",
    )
    assert (
        "video-to-video from t = 750" in capsys.readouterr().out
    )  # the student step at or below 800
    assert frames_of(run_dir).shape == (2, 12, 16, 16, 3)


def test_video_to_video_strength_checks(run_dir, tmp_path):
    np.savez(tmp_path / "in.npz", frames=toy.render(P, 0, 0, 6)[None].numpy())
    with pytest.raises(
        cv.CausVidError, match="below the student's lowest step t = 500; use at least 0.500"
    ):
        run(run_dir, "--video", str(tmp_path / "in.npz"), "--prompt", P, "--strength", "0.3")
    with pytest.raises(cv.CausVidError, match="fewer than --num-frames 12"):
        run(run_dir, "--video", str(tmp_path / "in.npz"), "--prompt", P, "--num-frames", "12")


def test_strength_one_ignores_the_input(run_dir, tmp_path):
    """At t = 1000 the noised input is pure noise: the output is the text-to-video sample."""
    np.savez(tmp_path / "in.npz", frames=toy.render(P, 0, 0, 6)[None].numpy())
    run(
        run_dir,
        "--video",
        str(tmp_path / "in.npz"),
        "--prompt",
        P,
        "--strength",
        "1",
        "--seed",
        "4",
    )
    v2v = frames_of(run_dir)
    run(run_dir, "--prompt", P, "--num-frames", "6", "--seed", "4")
    assert np.abs(v2v.astype(int) - frames_of(run_dir).astype(int)).max() <= 1


def test_dynamic_prompting(run_dir):
    run(run_dir, "--prompt", P, "--num-frames", "12", "--seed", "2")
    plain = frames_of(run_dir)
    run(
        run_dir,
        "--prompt",
        P,
        "--num-frames",
        "12",
        "--seed",
        "2",
        "--switch",
        "2:a red square moving up",
    )
    switched = frames_of(run_dir)
    assert np.array_equal(switched[:, :6], plain[:, :6])  # chunks before the switch are untouched
    assert not np.array_equal(switched[:, 6:], plain[:, 6:])
    for bad, msg in [
        ("x", "is not CHUNK:TEXT"),
        ("0:a red square moving up", "switch at 1 or later"),
        ("9:a red square moving up", "chunks 0..3"),
    ]:
        with pytest.raises(cv.CausVidError, match=msg):
            run(run_dir, "--prompt", P, "--switch", bad)


def test_long_video_reports_windows(run_dir, capsys):
    s = run(run_dir, "--prompt", P, "--num-frames", "36", "--window", "12")
    assert frames_of(run_dir).shape == (1, 36, 16, 16, 3) and s["window_psnr"].shape == (1, 3)
    s = run(run_dir, "--prompt", P, "--num-frames", "36", "--set", "sink=3")  # the rolling cache
    assert frames_of(run_dir).shape == (1, 36, 16, 16, 3) and s["window_psnr"].shape == (1, 3)
    assert "per-window best-fit PSNR: " in capsys.readouterr().out
    with pytest.raises(cv.CausVidError, match="--window 4 must be a multiple of the chunk size 3"):
        run(run_dir, "--prompt", P, "--window", "4")


def test_the_study_runs_end_to_end(run_dir, tmp_path, monkeypatch):
    """study.py trains its baselines and prints every table (tiny step counts, 4 prompts)."""
    import shutil

    import study

    for name in ["teacher", "ode", "dmd"]:
        shutil.copy(run_dir / f"{name}.safetensors", tmp_path / f"{name}.safetensors")
    shutil.copytree(run_dir / "ode_pairs", tmp_path / "ode_pairs")
    text = study.main(
        [
            "--tiny",
            "--run-dir",
            str(tmp_path),
            "--device",
            "cpu",
            "--seeds",
            "2",
            "--num-prompts",
            "8",
            "--causal-teacher-steps",
            "2",
            "--dmd-steps",
            "2",
            "--long-frames",
            "24",
            "--batch-size",
            "2",
            "--long-video",
            "36",
            "--set",
            "ode_pairs=3",
            "--set",
            "ode_steps=2",
            "--set",
            "warmup=1",
        ]
    )
    for name in [
        "causal_diffusion.safetensors",
        "dmd_no_ode/dmd.safetensors",
        "dmd_causal_teacher/dmd.safetensors",
        "study/results.md",
        "study/teacher_vs_causvid.gif",
        "self_forcing/dmd.safetensors",
        "causal_init/ode_pairs",
        "causal_init/dmd.safetensors",
        "causal_init_self_forcing/dmd.safetensors",
        "study/heldout_pairs",
    ]:
        assert (tmp_path / name).exists(), name
    for heading in [
        "Table 4",
        "Fig. 8",
        "Table 3",
        "Image-to-video",
        "Video-to-video",
        "Dynamic prompting",
        "Long video",
        "successors",
        "rolling cache, sink 3",
        "One student step",
        "What DMD saw",
    ]:
        assert heading in text
    if importlib.util.find_spec(
        "matplotlib"
    ):  # (requirements-bench.txt) the charts of what DMD saw
        assert (tmp_path / "study" / "dmd_log_dmd_no_ode.png").exists() and (
            tmp_path / "study" / "dmd_log_causal_init.png"
        ).exists()
    assert (
        text.count("| held-out (3) |") == 3 * 4
    )  # three models x four student steps, on three new pairs
    assert training.ODEPairs(str(tmp_path / "causal_init" / "ode_pairs")).teachers == {"causal"}
    assert text.count("CausVid** (ODE init") == 2  # a row of Table 4 and of Fig. 8
    assert 1.0 < study.predicted_cache_speedup(cv.get_config("tiny"), 48) < 20
    # on a causal_ode_init run the one-step table's new pairs are the causal teacher's,
    # made by its own sampler
    makers, sampler = [], cv.sample_ode_causal
    monkeypatch.setattr(
        cv,
        "sample_ode_causal",
        lambda model, *a, **k: makers.append(model) or sampler(model, *a, **k),
    )
    causal = study.main(
        [
            "--tiny",
            "--run-dir",
            str(tmp_path / "causal_init"),
            "--device",
            "cpu",
            "--only",
            "onestep",
        ]
    )
    assert training.ODEPairs(
        str(tmp_path / "causal_init" / "study" / "heldout_causal_pairs")
    ).teachers == {"causal"}
    assert (
        causal.count("| held-out (3) |") == 3 * 4
        and "the causal teacher's weights (before stage 1)" in causal
    )
    expected = utils.load_model(
        str(tmp_path / "causal_init" / "causal_diffusion.safetensors")
    ).state_dict()
    assert makers and all(
        m.causal and all(torch.equal(v, expected[k]) for k, v in m.state_dict().items())
        for m in makers
    )


def test_the_successors_study_trains_only_its_own_students(run_dir, tmp_path):
    """`--only train --only successors` (docs/successors.md) trains what the successors' table needs
    (here: nothing, their students exist), not Table 4's baselines, and writes its table."""
    import shutil

    import study

    for name in ["teacher", "ode", "dmd"]:
        shutil.copy(run_dir / f"{name}.safetensors", tmp_path / f"{name}.safetensors")
    for sub in [
        "self_forcing",
        "causal_init",
        "causal_init_self_forcing",
    ]:  # stand-ins for the three students
        (tmp_path / sub).mkdir()
        shutil.copy(run_dir / "dmd.safetensors", tmp_path / sub / "dmd.safetensors")
    text = study.main(
        [
            "--tiny",
            "--run-dir",
            str(tmp_path),
            "--device",
            "cpu",
            "--seeds",
            "1",
            "--num-prompts",
            "4",
            "--only",
            "train",
            "--only",
            "successors",
        ]
    )
    for baseline in ["causal_diffusion.safetensors", "dmd_no_ode", "dmd_causal_teacher"]:
        assert not (tmp_path / baseline).exists(), baseline
    assert text.count("| + ") == 3 and (tmp_path / "study" / "results_train_successors.md").exists()


def test_a_stream_does_not_know_its_length(run_dir, tmp_path):
    """With the same seed, a video is the prefix of every longer one: each chunk's noise (its start
    and its re-noising) depends only on the seed and the chunk's index. Also with a sliding window,
    image-to-video and video-to-video."""

    def frames(*extra):
        run(run_dir, "--prompt", P, "--seed", "9", *extra)
        return frames_of(run_dir)

    short, mid, long = (frames("--num-frames", n) for n in ("12", "24", "120"))
    assert (
        mid.shape[1] == 24
        and np.array_equal(mid[:, :12], short)
        and np.array_equal(long[:, :24], mid)
    )
    assert not np.array_equal(long[:, 24:36], long[:, 36:48])  # not one chunk repeated
    small = frames("--num-frames", "18", "--window", "6")  # slides every chunk
    assert np.array_equal(frames("--num-frames", "9", "--window", "6"), small[:, :9])
    imageio.imwrite(tmp_path / "first.png", toy.render(P, 2, 5, 1)[0].numpy())
    i2v = frames("--image", str(tmp_path / "first.png"), "--num-frames", "12")
    assert np.array_equal(
        frames("--image", str(tmp_path / "first.png"), "--num-frames", "6"), i2v[:, : 3 + 6]
    )
    np.savez(tmp_path / "in.npz", frames=toy.render(P, 0, 3, 24)[None].numpy())
    v2v = frames("--video", str(tmp_path / "in.npz"), "--num-frames", "24")
    assert np.array_equal(
        frames("--video", str(tmp_path / "in.npz"), "--num-frames", "12"), v2v[:, :12]
    )
