"""Streaming generation with the KV cache (Sec. 4.4, Alg. 2) and the applications of Sec. 5.3-5.4.

Samples the distilled causal student (<run>/dmd.safetensors, or --ckpt) chunk by chunk, prints the
time to the first chunk and the frames per second, and writes into --out (default: the run dir)
  <name>.gif and .mp4   the clips in a grid (upscaled to >= 128 px), each chunk written as made
  <name>.npz   toy world: frames uint8 (N, F, H, W, 3) and prompts (N,); and the scores (best-fit
               PSNR, prompt accuracy, diversity, steady motion; per window past training's length).

Modes (all through the one streaming loop, causvid.stream_generate):
  text-to-video      --prompt TEXT (repeatable: one video each; default all 48 toy prompts)
  image-to-video     --image PATH: the image, repeated to fill a chunk, is the cached first chunk
  video-to-video     --video PATH --strength S: each input chunk, as it arrives, is noised to the
                     student step nearest below S * 1000 and denoised from there (SDEdit)
  dynamic prompting  --switch CHUNK:TEXT (repeatable): from chunk CHUNK on, every video follows TEXT
  long videos        --num-frames N, any multiple of the chunk size; the cache keeps a --window of
                     frames (default: the training length) and re-encodes at positions from 0, or
                     with --set sink=N keeps the first N frames in a rolling cache (Wan's default)
--teacher samples the teacher (Euler + CFG; a causal one, --ckpt, chunk by chunk); --no-cache
recomputes the past at every step instead of using the cache (Table 3's baseline);
--first-chunk-teacher makes chunk 0 by the causal teacher's own sampler (the bound on a better
first chunk), and --set first_chunk_step_indices=... gives the student's chunk 0 steps of its own.
"""

import argparse
import os
import time
from dataclasses import replace

import numpy as np
import torch

import causvid as cv
import successors
import utils


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    utils.add_common_args(p)
    p.add_argument(
        "--ckpt",
        help="the model (default: <run>/dmd.safetensors; with --teacher the run's teacher)",
    )
    p.add_argument("--out", help="where the samples go (default: the run directory)")
    p.add_argument("--name", help="output file name stem (default: samples_<model>)")
    p.add_argument(
        "--prompt",
        action="append",
        help="a prompt; repeat for several (default: all 48 toy prompts)",
    )
    p.add_argument(
        "--samples-per-prompt", type=int, default=1, help="samples of each prompt (default: 1)"
    )
    p.add_argument(
        "--num-frames",
        type=int,
        help="frames per video, a multiple of the chunk size (default: the training length; with "
        "--video, its length)",
    )
    p.add_argument(
        "--teacher",
        action="store_true",
        help="sample the bidirectional teacher (Euler + CFG)",
    )
    p.add_argument(
        "--exact-teacher",
        action="store_true",
        help="with --teacher, toy world: the world's exact denoiser",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="recompute the past instead of the KV cache"
    )
    p.add_argument(
        "--image", help="image-to-video: the first frame (png, jpg, ...; resized if needed)"
    )
    p.add_argument("--video", help="video-to-video: an input video (mp4, gif, or a samples .npz)")
    p.add_argument(
        "--strength",
        type=float,
        default=0.75,
        help="video-to-video: how much of the input is replaced, in (0, 1]; denoising starts at "
        "the student step nearest below strength * 1000 (default: 0.75)",
    )
    p.add_argument(
        "--switch",
        action="append",
        default=[],
        metavar="CHUNK:TEXT",
        help="dynamic prompting: from chunk CHUNK (0-based) on, use TEXT; repeatable",
    )
    p.add_argument(
        "--window",
        type=int,
        help="frames one chunk attends over at most (default: the training length; 0: unbounded)",
    )
    p.add_argument(
        "--first-chunk-teacher",
        nargs="?",
        const="",
        metavar="PATH",
        help="chunk 0 by a causal teacher's own sampler (teacher_steps Euler steps, CFG), the rest "
        "by the student over it: the bound on a better first chunk (default PATH: the run's "
        "causal_diffusion.safetensors, else the shipped causal teacher)",
    )
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp32"],
        help="inference weights (default: bf16 on a GPU, fp32 on a CPU)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each DiT block (faster on a GPU after warm-up)",
    )
    return p.parse_args(argv)


# the Config fields a checkpoint fixes
ARCHITECTURE = (
    "channels",
    "patch_size",
    "dim",
    "ffn_dim",
    "num_heads",
    "num_layers",
    "freq_dim",
    "text_dim",
    "text_len",
    "eps",
)


def parse_switches(switches: list[str], num_chunks: int) -> dict[int, str]:
    """["2:a blue square moving right", ...] -> {2: "a blue square moving right", ...}."""
    out = {}
    for item in switches:
        chunk, _, text = item.partition(":")
        if not chunk.strip().isdigit() or not text.strip():
            raise cv.CausVidError(
                f"--switch {item!r} is not CHUNK:TEXT; write e.g. "
                "--switch '2:a blue square moving right'"
            )
        if not 0 < int(chunk) < num_chunks:
            raise cv.CausVidError(
                f"--switch at chunk {int(chunk)}: the video has chunks 0..{num_chunks - 1}; "
                "switch at 1 or later"
            )
        out[int(chunk)] = text.strip()
    return out


def check_args(args, cfg: cv.Config) -> int | None:
    """Everything about the flags that can be wrong, said before any model is loaded. -> the
    window (None: unbounded)."""
    K = cfg.chunk_size
    if any(not p.strip() for p in args.prompt or []):
        raise cv.CausVidError(
            "--prompt '' is empty; give a text prompt such as 'a red square moving left'"
        )
    if args.samples_per_prompt < 1:
        raise cv.CausVidError(f"--samples-per-prompt {args.samples_per_prompt} must be at least 1")
    if args.teacher and (args.image or args.video or args.switch or args.window is not None):
        raise cv.CausVidError(
            "--image, --video, --switch and --window stream with the causal student; drop --teacher"
        )
    if args.first_chunk_teacher is not None and (args.teacher or args.video):
        raise cv.CausVidError(
            "--first-chunk-teacher makes chunk 0 of the student's stream from noise; drop "
            "--teacher or --video"
        )
    if args.exact_teacher and not args.teacher:
        raise cv.CausVidError("--exact-teacher replaces the teacher: add --teacher")
    if args.image and args.video:
        raise cv.CausVidError("give --image or --video, not both")
    if args.window == 0:
        return None
    window = args.window or cfg.num_frames
    if window % K or window < 2 * K:
        raise cv.CausVidError(
            f"--window {window} must be a multiple of the chunk size {K}, at least {2 * K} (or 0 "
            "for an unbounded cache)"
        )
    return window


def frame_count(args, cfg: cv.Config, video, world, window) -> int:
    """The frames (latent) each video gets: --num-frames; else --video's whole chunks; else the
    training length."""
    K = cfg.chunk_size
    given = None if video is None else world.latent_frames(video.shape[1])
    if args.num_frames is not None:
        num_frames = args.num_frames
    elif given is not None:
        num_frames = given // K * K
    else:
        num_frames = cfg.num_frames
    if num_frames <= 0 or num_frames % K:
        raise cv.CausVidError(
            f"--num-frames {num_frames} must be a positive multiple of the chunk size {K}, e.g. "
            f"{max(1, num_frames // K) * K}"
        )
    if given is not None and given < num_frames:
        raise cv.CausVidError(
            f"--video has {video.shape[1]} frames, fewer than --num-frames {num_frames}"
        )
    if args.no_cache and window is not None and num_frames > window:
        raise cv.CausVidError(
            "--no-cache recomputes the whole past; use it with --window 0 or videos no longer than "
            f"the window ({window} frames)"
        )
    return num_frames


def load(args, path: str, cfg: cv.Config, device):
    """The model, how it samples ("student", "causal" or "teacher"), and the config it samples with:
    the checkpoint's network under the flags' settings (--set changes how it samples)."""
    causal = None if args.teacher else True  # a teacher keeps the role it was trained in
    model = utils.load_model(path, causal=causal, device=device, expect=cfg)
    if not args.teacher:
        kind = "student"
    elif model.causal and not args.exact_teacher:
        kind = "causal"
    else:
        kind = "teacher"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    model = utils.prepare_for_inference(model, device, dtype, args.compile)
    overrides = utils.parse_overrides(args.set)
    for k in ARCHITECTURE:
        if k in overrides and overrides[k] != getattr(model.cfg, k):
            raise cv.CausVidError(
                f"--set {k}: the network's shape comes from the checkpoint "
                f"({k}={getattr(model.cfg, k)!r}); drop it"
            )
    paths = dict(
        text_encoder=cfg.text_encoder or model.cfg.text_encoder, vae=cfg.vae or model.cfg.vae
    )
    return model, kind, replace(model.cfg, **{**paths, **overrides})


def texts(
    text_encoder, prompts: list[str], switches: dict[int, str], num_chunks: int, negative: str
):
    """-> (the text of the videos (N, L, D_text), or one such tensor per chunk where the prompt
    switches: the latest switch at or before it, else the video's own prompt; the negative
    prompt's embedding (1, L, D_text))."""
    emb = text_encoder.embed(prompts + list(switches.values()) + [negative])
    text = utils.stack_text(emb, prompts, "cpu")
    if switches:
        per_chunk = []
        for c in range(num_chunks):
            latest = max([s for s in switches if s <= c], default=None)
            per_chunk.append(text if latest is None else emb[switches[latest]].expand_as(text))
        text = per_chunk
    return text, emb[negative][None]


def role(args, kind: str) -> str:
    """What the model is, in words."""
    if args.exact_teacher:
        return "exact toy teacher"
    return {
        "student": "causal student",
        "causal": "causal teacher",
        "teacher": "bidirectional teacher",
    }[kind]


def mode(args, switches: dict[int, str], cfg: cv.Config, start: int) -> str:
    """Which application runs, in words."""
    if args.image:
        words = "image-to-video"
    elif args.video:
        words = f"video-to-video from t = {cv.student_timesteps(cfg)[start]:.0f}"
    else:
        words = "text-to-video"
    if switches:
        words += f", prompt switches {switches}"
    return words


def main(argv=None):
    args = parse_args(argv)

    # Validate: the flags, the inputs, then the model.
    cfg, device, run = utils.resolve(args)
    window = check_args(args, cfg)
    K = cfg.chunk_size
    world = utils.make_world(cfg, device, args.model_dir)  # the preset's: frame size, teacher
    video = utils.read_video(args.video, world) if args.video else None
    num_frames = frame_count(args, cfg, video, world, window)
    switches = parse_switches(args.switch, num_frames // K)
    start = utils.student_start(cfg, args.strength) if args.video else 0
    image = utils.read_frames(args.image, *world.pixel_size)[0, :1] if args.image else None
    out = utils.writable_dir(args.out or run, "--out")
    if args.ckpt:
        path = args.ckpt
    elif args.teacher:
        path = utils.teacher_path(args, run, world)
    else:
        path = os.path.join(run, "dmd.safetensors")
    model, kind, cfg = load(args, path, cfg, device)
    # the same world at the config the checkpoint samples with; Wan's needs its VAE
    world = utils.make_world(cfg, device, args.model_dir)
    world.check_pixels()
    text_encoder = world.text_encoder(path)
    if args.exact_teacher:
        model = world.exact_teacher(text_encoder)
    sink = None  # a rolling cache where the stream outgrows the window
    if cfg.sink >= 0 and window is not None and num_frames + K * (image is not None) > window:
        sink = cfg.sink
        if sink > window - 2 * K:
            raise cv.CausVidError(
                f"sink {sink} leaves no room for two chunks in the window {window}; lower it"
            )

    # Inputs: the prompts, the text of each chunk, the image or the video to follow.
    base = args.prompt or world.prompts
    if not base:
        raise cv.CausVidError(f"{world.name} has no prompts of its own: give --prompt TEXT")
    if video is not None and video.shape[0] > 1:  # an npz of several videos: one prompt each
        if len(base) not in (1, video.shape[0]):
            raise cv.CausVidError(
                f"--video holds {video.shape[0]} videos: give one --prompt, or one per video"
            )
        base = base * (video.shape[0] // len(base))
    prompts = [p for p in base for _ in range(args.samples_per_prompt)]
    text, uncond = texts(text_encoder, prompts, switches, num_frames // K, cfg.negative_prompt)
    rows = torch.arange(len(prompts)) // args.samples_per_prompt
    if video is not None:
        video = video[rows % video.shape[0], : world.pixel_frames(num_frames)]
    context = None  # Sec. 5.3: the image, still for a chunk, is the cached chunk 0
    if image is not None:
        still = image.expand(world.pixel_frames(K), -1, -1, -1)
        context = world.encode(still[None]).cpu().expand(len(prompts), -1, -1, -1, -1)
    print(
        f"model: {path} ({role(args, kind)}), {len(prompts)} videos of {num_frames} frames, "
        f"{mode(args, switches, cfg, start)}, window {window or 'unbounded'}, device {device}"
    )

    # Stream: chunk after chunk, each written as it arrives.
    if args.no_cache:
        generate = cv.recompute_generate
    else:
        generate = utils.streaming(window, sink, cfg.sink_gap)
    first = None  # the bound: chunk 0 by a causal teacher's own sampler
    if args.first_chunk_teacher is not None:
        first_path = args.first_chunk_teacher or utils.causal_teacher_path(args, run, world)
        teacher = utils.load_model(first_path, device=device, expect=cfg)
        if not teacher.causal:
            raise cv.CausVidError(
                f"--first-chunk-teacher {first_path} is a bidirectional model; give a causal "
                "diffusion model (weights/toy_causal_teacher.safetensors)"
            )
        dtype = next(model.parameters()).dtype  # the student's inference weights
        teacher = utils.prepare_for_inference(teacher, device, dtype)
        steps, guidance = cfg.teacher_steps, cfg.teacher_guidance
        print(f"first chunk: {first_path} ({steps} Euler steps, CFG {guidance})")
        first = successors.teacher_first_chunk(
            teacher, uncond.to(device), guidance, steps, cfg.shift
        )
    make = utils.sampler(
        model,
        kind,
        cfg,
        device,
        uncond=uncond.to(device),
        generate=generate,
        start=start,
        first=first,
    )
    stream = utils.stream_video(
        make,
        text,
        num_frames,
        world,
        seed=args.seed,
        context=context,
        video=video,
        batch=args.batch_size or world.sampling_batch,
    )
    stem = os.path.join(out, args.name or "samples_" + os.path.splitext(os.path.basename(path))[0])
    stamps = []  # when each made chunk arrived
    kept = []  # the frames, for the .npz and the scores (the toy world's)
    t0 = time.perf_counter()
    with utils.VideoWriter([stem + ".gif", stem + ".mp4"]) as files:
        for i, frames in enumerate(stream):
            if i or image is None:  # (with --image the first chunk is the given one: not timed)
                stamps.append((time.perf_counter(), frames.shape[1]))
            files.append(frames)
            if world.score is not None:
                kept.append(frames)

    # Write: the timing, the .npz and the scores.
    seconds = time.perf_counter() - t0
    ms = torch.tensor([t0] + [t for t, _ in stamps]).diff() * 1000
    shown = sum(n for _, n in stamps)
    later = ""
    if len(ms) > 1:
        later = f", then {ms[1:].median():.0f} ms a chunk (slowest {ms[1:].max():.0f})"
    print(
        f"time to first chunk {ms[0] / 1000:.3f} s{later} for {len(prompts)} videos | "
        f"{len(prompts) * shown / seconds:.1f} frames/s | {seconds:.1f} s in all"
    )
    print(f"wrote {stem}.gif, {stem}.mp4" + (f", {stem}.npz" if kept else ""))
    if not kept:
        return None
    frames = torch.cat(kept, 1)
    tmp = f"{stem}.npz.tmp{os.getpid()}.npz"
    np.savez(tmp, frames=frames.numpy(), prompts=np.array(prompts))
    os.replace(tmp, f"{stem}.npz")
    if all(p in world.prompts for p in prompts) and not (switches or args.video or args.image):
        return world.score(frames, prompts, several=args.samples_per_prompt > 1)
    return None


if __name__ == "__main__":
    utils.run_cli(main)
