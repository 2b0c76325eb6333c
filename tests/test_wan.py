"""Wan2.1 for real, proven without the weights: tiny random models written in both official layouts
load through exactly the code path the real ones use, and our DiT, text encoder wrapper and VAE
wrapper reproduce diffusers' / transformers' outputs."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import causvid as cv
import successors
import training
import utils
import wan

diffusers = pytest.importorskip("diffusers")
from conftest import TINY_DIT  # noqa: E402  (the tiny Wan directory's DiT)
from einops import rearrange  # noqa: E402
from transformers import ByT5Tokenizer, UMT5EncoderModel  # noqa: E402


def small_base():
    return cv.get_config(
        "wan2.1-t2v-1.3b", height=4, width=6, num_frames=6, chunk_size=3, text_len=12
    )


def test_the_diffusers_layout_loads_and_matches_diffusers(wan_dir):
    assert (
        len([n for n in os.listdir(wan_dir / "transformer") if n.endswith(".safetensors")]) > 1
    )  # sharded
    cfg, _, layout = wan.wan_config(str(wan_dir), small_base())
    assert layout == "diffusers" and (cfg.dim, cfg.num_layers, cfg.channels, cfg.text_dim) == (
        24,
        2,
        4,
        16,
    )
    assert cfg.text_encoder.endswith("text_encoder") and cfg.vae.endswith("vae")
    ours = utils.load_model(str(wan_dir), causal=False, expect=small_base()).eval()
    ref = diffusers.WanTransformer3DModel(**TINY_DIT).eval()
    ref.load_state_dict(wan.read_safetensors_dir(str(wan_dir / "transformer")))
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 6, 4, 4, 6, generator=g), torch.randn(2, 12, 16, generator=g)
    t = torch.tensor([700.0, 150.0])
    with torch.no_grad():
        a = ours(x, t[:, None].expand(2, 6), text)
        b = ref(rearrange(x, "b f c h w -> b c f h w"), t, text).sample
    assert (a - rearrange(b, "b c f h w -> b f c h w")).abs().max() <= 1e-4 and a.abs().max() > 1e-2


def test_the_original_layout_loads_with_wan_names(tmp_path, wan_dir):
    """Original Wan2.1-T2V-1.3B: config.json with Wan's keys, weights under Wan's (= our) names."""
    src = utils.load_model(str(wan_dir), expect=small_base())
    save_file(
        {k: v.contiguous() for k, v in src.state_dict().items()},
        str(tmp_path / "diffusion_pytorch_model.safetensors"),
    )
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "WanModel",
                "model_type": "t2v",
                "dim": 24,
                "ffn_dim": 40,
                "freq_dim": 32,
                "in_dim": 4,
                "out_dim": 4,
                "num_heads": 2,
                "num_layers": 2,
                "text_dim": 16,
                "patch_size": [1, 2, 2],
                "eps": 1e-6,
            }
        )
    )
    cfg, _, layout = wan.wan_config(str(tmp_path), small_base())
    assert layout == "original"
    loaded = utils.load_model(str(tmp_path), causal=True, expect=small_base())
    assert loaded.causal and all(
        torch.equal(v, loaded.state_dict()[k]) for k, v in src.state_dict().items()
    )


def test_loading_is_strict(tmp_path, wan_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(wan_dir / "transformer", broken / "transformer")
    index = json.loads(
        (broken / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text()
    )
    shard = sorted(set(index["weight_map"].values()))[0]
    os.remove(broken / "transformer" / shard)
    with pytest.raises(cv.CausVidError, match=f"shard '{shard}' listed in .* is missing"):
        utils.load_model(str(broken), expect=small_base())
    state = wan.read_safetensors_dir(str(wan_dir / "transformer"))
    state["blocks.0.extra.weight"] = torch.zeros(1)
    del state["proj_out.bias"]
    with pytest.raises(
        cv.CausVidError,
        match=(
            r"does not fit.*missing \['head.head.bias'\]|"
            r"keys our DiT does not: \['blocks.0.extra.weight'\]"
        ),
    ):
        wan.from_diffusers_state_dict(cv.DiT(wan.wan_config(str(wan_dir), small_base())[0]), state)
    with pytest.raises(cv.CausVidError, match="not a Wan2.1 directory"):
        utils.load_model(str(tmp_path), expect=small_base())


def test_the_text_encoder_wrapper_matches_transformers(wan_dir):
    enc = wan.load_umt5(str(wan_dir / "text_encoder"), text_len=12)
    prompts = ["a cat", "a dog runs"]  # shorter than text_len (truncation is tested elsewhere)
    out = enc(prompts)
    ref = UMT5EncoderModel.from_pretrained(wan_dir / "text_encoder").eval()
    tok = ByT5Tokenizer()
    for i, p in enumerate(prompts):
        ids = tok([p], return_tensors="pt").input_ids[:, :12]
        with torch.no_grad():
            expect = ref(input_ids=ids).last_hidden_state[0]
        n = ids.shape[1]
        assert (out[i, :n] - expect).abs().max() <= 1e-4  # the prompt's tokens, unpadded
        assert (out[i, n:] == 0).all()  # zeros after the prompt, as Wan pads


def test_the_vae_wrapper_matches_diffusers_and_streams(wan_dir):
    vae = wan.WanVAE(str(wan_dir / "vae"))
    ref = diffusers.AutoencoderKLWan.from_pretrained(wan_dir / "vae").eval()
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, 6, 4, 4, 6, generator=g)
    pixels = vae.decode(z)
    assert pixels.shape == (1, 1 + 4 * 5, 3, 32, 48)
    mean, std = (
        torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1),
        torch.tensor([1.5, 0.5, 2.0, 1.0]).view(1, 4, 1, 1, 1),
    )
    with torch.no_grad():
        expect = ref.decode(rearrange(z, "b f c h w -> b c f h w") * std + mean).sample
    assert (pixels - rearrange(expect, "b c f h w -> b f c h w")).abs().max() <= 1e-4
    streamed = torch.cat(list(vae.decode_stream(z.split(3, 1))), 1)  # two chunks of 3 latent frames
    assert (streamed - pixels).abs().max() <= 1e-4
    latents = vae.encode(pixels)
    assert latents.shape == z.shape
    with torch.no_grad():
        mu = ref.encode(rearrange(pixels, "b f c h w -> b c f h w")).latent_dist.mode()
    assert (
        latents
        - (rearrange(mu, "b c f h w -> b f c h w") - mean.view(1, 1, 4, 1, 1))
        / std.view(1, 1, 4, 1, 1)
    ).abs().max() <= 1e-4
    # encoding as the frames arrive,
    # in pieces that do not line up with the VAE's 1 + 4 + 4 ... frames
    pieces = [pixels[:, :2], pixels[:, 2:7], pixels[:, 7:8], pixels[:, 8:]]
    streamed = list(vae.encode_stream(iter(pieces), 3))
    assert [z.shape[1] for z in streamed] == [3, 3] and (
        torch.cat(streamed, 1) - latents
    ).abs().max() <= 1e-5


def test_the_three_scripts_run_on_a_wan_layout_directory(wan_run, tmp_path):
    """...and sample.py decodes through the VAE into an mp4."""
    import imageio.v2 as imageio
    import numpy as np

    import sample
    import train_ode

    common, run = wan_run
    ode = utils.load_model(str(run / "ode.safetensors"))
    assert ode.causal and ode.cfg.dim == 24 and ode.cfg.vae.endswith("vae")
    sample.main(common + ["--prompt", "a cat walking", "--name", "wan"])
    frames = np.stack(
        imageio.mimread(run / "wan.mp4")
    )  # 6 latent frames -> 21 pixel frames of 32x48, x4 + borders
    assert (
        frames.shape == (1 + 4 * 5, 4 * 32 + 2, 4 * 48 + 2, 3) and not (run / "wan.npz").exists()
    )  # npz: toy only
    with pytest.raises(cv.CausVidError, match="Wan's frames go through its VAE: pass --model-dir"):
        sample.main(
            common + ["--prompt", "a cat walking", "--set", "vae="]
        )  # no VAE to decode with
    with pytest.raises(cv.CausVidError, match="pass --prompts FILE"):
        train_ode.main(common + ["--run-dir", str(tmp_path / "other")])
    with pytest.raises(
        cv.CausVidError,
        match="needs a causal diffusion model at .*none is shipped or trained for Wan",
    ):
        train_ode.main(
            common
            + [
                "--run-dir",
                str(tmp_path / "cf"),
                "--prompts",
                str(run.parent / "prompts.txt"),
                "--recipe",
                "causal-forcing",
            ]
        )  # Causal Forcing's Wan teacher is not ours to train
    assert not (tmp_path / "cf" / "ode_pairs").exists()
    # train_dmd.py runs stage 1 first where it has prompts (Wan's: --prompts), else says so
    import train_dmd

    both = ["--run-dir", str(tmp_path / "both"), "--steps", "1"]
    with pytest.raises(cv.CausVidError, match="stage-1 checkpoint .* not found; run train_ode.py"):
        train_dmd.main(common + both)
    prompts = ["--prompts", str(run.parent / "prompts.txt"), "--pairs", "2", "--ode-steps", "1"]
    train_dmd.main(common + both + prompts)
    assert utils.load_model(str(tmp_path / "both" / "dmd.safetensors")).causal


def test_bf16_inference_stays_close_to_fp32(wan_run):
    """bf16 weights (the GPU default) stream the same video as fp32 weights, up to bf16 rounding."""
    common, run = wan_run
    cfg = utils.load_model(str(run / "dmd.safetensors")).cfg
    text = torch.randn(2, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(0))
    videos = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = utils.prepare_for_inference(
            utils.load_model(str(run / "dmd.safetensors")), torch.device("cpu"), dtype
        )
        assert model.blocks[0].self_attn.q.weight.dtype == dtype
        noise = torch.randn(
            2, 12, cfg.channels, cfg.height, cfg.width, generator=torch.Generator().manual_seed(5)
        )
        rng = torch.Generator().manual_seed(6)
        chunks = successors.rolling_generate(
            model, noise, text, cv.student_timesteps(cfg), rng, window=9, sink=3
        )
        videos[dtype] = torch.cat(list(chunks), 1).float()
    error = (videos[torch.bfloat16] - videos[torch.float32]).abs().max() / videos[
        torch.float32
    ].abs().max()
    assert 0 < error < 0.05, error


def test_long_wan_videos_keep_the_first_latent_chunk(wan_run, monkeypatch):
    """Wan's latent frame 0 stands for one pixel frame, the others for four: a long video must not
    put a mid-video latent at position 0. The Wan preset streams long videos with a rolling cache
    whose sink is the first chunk, frame 0 included, at its own positions,
    and re-encodes nothing."""
    import imageio.v2 as imageio

    import sample

    common, run = wan_run
    caches, fills, real_fill, real_init = [], [], cv.fill_cache, successors.RollingKVCache.__init__
    monkeypatch.setattr(
        successors.RollingKVCache,
        "__init__",
        lambda self, *a: real_init(self, *a) or caches.append(self),
    )
    monkeypatch.setattr(
        cv,
        "fill_cache",
        lambda model, cache, x0, text: (
            fills.append(x0.shape[1]) or real_fill(model, cache, x0, text)
        ),
    )
    sample.main(
        common
        + ["--prompt", "a cat walking", "--name", "long", "--num-frames", "18", "--window", "9"]
    )
    assert len(imageio.mimread(run / "long.mp4")) == 1 + 4 * 17
    assert (
        len(caches) == 1 and caches[0].sink == 3 and caches[0].window == 9
    )  # one cache for the whole video
    assert fills == [3] * 5  # each finished chunk written once: nothing re-encoded
    assert caches[0].num_frames == 6  # the sink and the latest chunk
    with pytest.raises(cv.CausVidError, match="leaves no room for two chunks"):
        sample.main(common + ["--prompt", "a cat walking", "--num-frames", "18"])  # window 6


def test_the_bench_runs_at_toy_size(capsys):
    """bench.py on a CPU at toy size: every row of the table (inference eager and compiled, with
    chunk 0 by a causal teacher, one ODE step, one DMD iteration of each kind through the scripts'
    own step functions)."""
    import bench

    rows = bench.main(["--tiny", "--device", "cpu", "--repeats", "1"])
    assert [r[0] for r in rows] == [
        "DiT streaming, eager",
        "DiT streaming, compiled",
        "chunk 0 by a causal teacher (24 steps, CFG), eager",
        "ODE regression step",
        "DMD iteration, generator + critic",
        "DMD iteration, critic only",
    ]
    assert "TFLOP/s" in rows[0][3] and "| DMD iteration, critic only |" in capsys.readouterr().out
    assert (
        f"{bench.parameters(cv.get_config('wan2.1-t2v-1.3b')) / 1e9:.3f}" == "1.419"
    )  # Wan2.1-T2V-1.3B's DiT
    full = bench.stream_flops(cv.get_config("wan2.1-t2v-1.3b"), 21)
    assert (
        7.0e14 < full < 8.0e14
    )  # about 756 TFLOP for one 81-frame video (3 steps + cache writes per chunk)


# ---------------------------------------------------------------------------------------------
# Export: a diffusers transformer directory and a LoRA against the teacher (export.py)
# ---------------------------------------------------------------------------------------------


def diffusers_output(model, x, t, text):
    with torch.no_grad():
        return rearrange(
            model(rearrange(x, "b f c h w -> b c f h w"), t, text).sample, "b c f h w -> b f c h w"
        )


def probe():
    g = torch.Generator().manual_seed(5)
    return (
        torch.randn(2, 6, 4, 4, 6, generator=g),
        torch.tensor([800.0, 300.0]),
        torch.randn(2, 12, 16, generator=g),
    )


def test_export_writes_a_diffusers_directory_with_the_students_outputs(wan_run, tmp_path):
    import export

    common, run = wan_run
    export.main(common + ["--lora-rank", "0", "--out", str(tmp_path)])
    theirs = diffusers.WanTransformer3DModel.from_pretrained(str(tmp_path / "transformer")).eval()
    ours = utils.load_model(
        str(run / "dmd.safetensors"), causal=False
    ).eval()  # the student, bidirectional
    x, t, text = probe()
    with torch.no_grad():
        a = ours(x, t[:, None].expand(2, 6), text)
    assert (a - diffusers_output(theirs, x, t, text)).abs().max() <= 1e-4 and a.abs().max() > 1e-2
    assert not list(tmp_path.glob("*lora*"))  # --lora-rank 0: the directory alone


def test_export_lora_loads_with_diffusers_and_reproduces_the_student_at_full_rank(
    wan_dir, wan_run, tmp_path, capsys
):
    """A student that differs from the teacher in its linear layers (weights and biases), the part
    a LoRA can carry: at full rank diffusers' own Wan LoRA loading (ComfyUI's format, converted) on
    the teacher gives the student's outputs; at lower ranks the error falls as the rank grows."""
    from diffusers.loaders import WanLoraLoaderMixin

    import export

    common, run = wan_run
    teacher = utils.load_model(
        str(wan_dir), causal=False, expect=small_base()
    )  # compared without the mask
    student = copy_with_linear_noise(teacher)
    training.save_model(str(tmp_path / "student.safetensors"), student)
    x, t, text = probe()
    with torch.no_grad():
        target = student.eval()(x, t[:, None].expand(2, 6), text)
    errors = {}
    for rank in (1, 4, 40):  # 40 >= every layer's smaller side: full rank
        export.main(
            common
            + [
                "--ckpt",
                str(tmp_path / "student.safetensors"),
                "--lora-rank",
                str(rank),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        path = tmp_path / "out" / f"causvid_lora_rank{rank}.safetensors"
        model = diffusers.WanTransformer3DModel.from_pretrained(str(wan_dir / "transformer")).eval()
        model.load_lora_adapter(WanLoraLoaderMixin.lora_state_dict(str(path)), prefix="transformer")
        errors[rank] = (diffusers_output(model, x, t, text) - target).abs().max().item()
    assert errors[40] <= 1e-4 < errors[4] < errors[1], errors
    out = capsys.readouterr().out
    assert "blocks.self_attn.q.weight" in out and "not in the LoRA" in out


def copy_with_linear_noise(model):
    import copy

    student = copy.deepcopy(model)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * 0.05)
                m.bias.add_(torch.randn(m.bias.shape, generator=g) * 0.05)
    return student


def test_export_refuses_toy_checkpoints_and_a_lora_without_its_teacher(wan_run, run_dir, tmp_path):
    import export

    common, run = wan_run
    with pytest.raises(cv.CausVidError, match="toy-world checkpoint; export is for Wan students"):
        export.main(["--tiny", "--run-dir", str(run_dir)])
    with pytest.raises(cv.CausVidError, match="pass --model-dir"):
        export.main(["--config", "wan2.1-t2v-1.3b", "--run-dir", str(run), "--out", str(tmp_path)])
    assert not (tmp_path / "transformer").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------
# Image- and video-to-video on Wan, through the VAE's encoder (sample.py)
# ---------------------------------------------------------------------------------------------


def test_wan_image_to_video_starts_from_the_image_in_the_cache(wan_run, tmp_path, monkeypatch):
    """The image, still for a chunk's 1 + 4 (K - 1) pixel frames, is encoded into K latent frames
    that fill the cache before the first generated chunk; the decoded video starts with it; same
    seed, same frames."""
    import imageio.v2 as imageio
    import numpy as np

    import sample

    common, run = wan_run
    image = (
        (torch.rand(32, 48, 3, generator=torch.Generator().manual_seed(1)) * 255)
        .to(torch.uint8)
        .numpy()
    )
    imageio.imwrite(tmp_path / "first.png", image)
    filled, real_fill = [], cv.fill_cache
    monkeypatch.setattr(
        cv,
        "fill_cache",
        lambda model, cache, x0, text: (
            filled.append(x0.clone()) or real_fill(model, cache, x0, text)
        ),
    )
    args = common + [
        "--prompt",
        "a cat walking",
        "--image",
        str(tmp_path / "first.png"),
        "--out",
        str(tmp_path),
        "--num-frames",
        "3",
    ]  # the image's chunk + 1 generated chunk fill the 6-frame window
    sample.main(args + ["--name", "i2v"])
    still = (
        torch.from_numpy(image)
        .float()
        .div(127.5)
        .sub(1)
        .permute(2, 0, 1)[None, None]
        .expand(1, 9, -1, -1, -1)
    )
    expect = wan.WanVAE(utils.load_model(str(run / "dmd.safetensors")).cfg.vae).encode(still)
    assert (
        filled[0].shape == (1, 3, 4, 4, 6) and (filled[0] - expect).abs().max() <= 1e-5
    )  # the image first
    frames = np.stack(imageio.mimread(tmp_path / "i2v.mp4"))
    assert len(frames) == 1 + 4 * (
        3 + 3 - 1
    )  # the image's 3 latent frames + 3 generated, decoded together
    sample.main(args + ["--name", "again"])
    assert np.array_equal(frames, np.stack(imageio.mimread(tmp_path / "again.mp4")))
    assert (tmp_path / "i2v.gif").read_bytes() == (
        tmp_path / "again.gif"
    ).read_bytes()  # the same bytes


def test_wan_video_to_video_encodes_chunk_by_chunk_and_refuses_bad_inputs(
    wan_run, tmp_path, capsys
):
    import imageio.v2 as imageio
    import numpy as np

    import sample

    common, run = wan_run
    clip = (
        (torch.rand(1, 21, 32, 48, 3, generator=torch.Generator().manual_seed(2)) * 255)
        .to(torch.uint8)
        .numpy()
    )
    np.savez(tmp_path / "in.npz", frames=clip)
    args = common + [
        "--prompt",
        "a cat walking",
        "--out",
        str(tmp_path),
        "--name",
        "v2v",
        "--strength",
        "0.8",
    ]
    sample.main(
        args + ["--video", str(tmp_path / "in.npz")]
    )  # 21 frames -> 6 latent frames, 2 chunks
    assert (
        len(imageio.mimread(tmp_path / "v2v.mp4")) == 21 and "ms a chunk" in capsys.readouterr().out
    )
    for frames, msg in [
        (20, "Wan's VAE encodes 1 \\+ 4k frames: trim it to 17"),
        (5, "fewer than one chunk \\(9\\)"),
    ]:
        np.savez(tmp_path / "bad.npz", frames=clip[:, :frames])
        with pytest.raises(cv.CausVidError, match=msg):
            sample.main(args + ["--video", str(tmp_path / "bad.npz")])
    np.savez(
        tmp_path / "big.npz", frames=clip.repeat(2, 2).repeat(2, 3)
    )  # 64x96: resized, with a note
    sample.main(args + ["--video", str(tmp_path / "big.npz")])
    assert "resized" in capsys.readouterr().out
