"""Streaming generation with the KV cache (Sec. 4.4, Alg. 2) and the applications of Sec. 5.3-5.4.

Samples the distilled causal student (<run>/dmd.safetensors, or --ckpt) chunk by chunk, prints the time
to the first chunk and the frames per second, and writes into --out (default: the run directory)
  <name>.gif and .mp4   the clips in a grid (upscaled to >= 128 px), each chunk written as it is made
  <name>.npz   toy world: frames uint8 (N, F, H, W, 3) and prompts (N,); and the scores (best-fit PSNR,
               prompt accuracy, diversity, steady motion; per window for videos longer than training's).

Modes (all through the one streaming loop, causvid.stream_generate):
  text-to-video      --prompt TEXT (repeatable: one video each; default all 48 toy prompts)
  image-to-video     --image PATH: the image, repeated to fill a chunk, is the cached first chunk
  video-to-video     --video PATH --strength S: each input chunk, as it arrives, is noised to the
                     student step nearest below S * 1000 and denoised from there (SDEdit)
  dynamic prompting  --switch CHUNK:TEXT (repeatable): from chunk CHUNK on, every video follows TEXT
  long videos        --num-frames N, any multiple of the chunk size; the cache keeps a --window of
                     frames (default: the training length) and re-encodes at positions from 0, or
                     with --set sink=N keeps the first N frames in a rolling cache (Wan's default)
--teacher samples the teacher (Euler + CFG; a causal one, --ckpt, chunk by chunk); --no-cache recomputes
the past at every step instead of using the cache (Table 3's baseline).
"""

import argparse
import os
import time
from dataclasses import replace

import numpy as np
import torch

import causvid as cv
import toy_world as toy
import utils
import wan


def parse_args(argv=None):
    p = utils.add_common_args(argparse.ArgumentParser(description=__doc__,
                                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--ckpt", help="the model (default: <run>/dmd.safetensors; with --teacher <run>/teacher.safetensors)")
    p.add_argument("--out", help="where the samples go (default: the run directory)")
    p.add_argument("--name", help="output file name stem (default: samples_<model>)")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several (default: all 48 toy prompts)")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="samples of each prompt (default: 1)")
    p.add_argument("--num-frames", type=int, help="frames per video, a multiple of the chunk size "
                                                  "(default: the training length; with --video, its length)")
    p.add_argument("--teacher", action="store_true", help="sample the bidirectional teacher (Euler + CFG)")
    p.add_argument("--exact-teacher", action="store_true", help="with --teacher, toy world: the world's exact denoiser")
    p.add_argument("--no-cache", action="store_true", help="recompute the past instead of the KV cache")
    p.add_argument("--image", help="image-to-video: the first frame (png, jpg, ...; resized if needed)")
    p.add_argument("--video", help="video-to-video: an input video (mp4, gif, or a samples .npz)")
    p.add_argument("--strength", type=float, default=0.75,
                   help="video-to-video: how much of the input is replaced, in (0, 1]; denoising starts at "
                        "the student step nearest below strength * 1000 (default: 0.75)")
    p.add_argument("--switch", action="append", default=[], metavar="CHUNK:TEXT",
                   help="dynamic prompting: from chunk CHUNK (0-based) on, use TEXT; repeatable")
    p.add_argument("--window", type=int, help="frames one chunk attends over at most (default: the "
                                              "training length; 0: unbounded)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="inference weights (default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile each DiT block (faster on a GPU after warm-up)")
    return p.parse_args(argv)


ARCHITECTURE = ("channels", "patch_size", "dim", "ffn_dim", "num_heads", "num_layers", "freq_dim",
                "text_dim", "text_len", "eps")  # Config fields a checkpoint fixes


def parse_switches(switches: list[str], num_chunks: int) -> dict[int, str]:
    """["2:a blue square moving right", ...] -> {2: "a blue square moving right", ...}."""
    out = {}
    for item in switches:
        chunk, _, text = item.partition(":")
        if not chunk.strip().isdigit() or not text.strip():
            raise cv.CausVidError(f"--switch {item!r} is not CHUNK:TEXT; write e.g. --switch '2:a blue square moving right'")
        if not 0 < int(chunk) < num_chunks:
            raise cv.CausVidError(f"--switch at chunk {int(chunk)}: the video has chunks 0..{num_chunks - 1}; "
                                  "switch at 1 or later")
        out[int(chunk)] = text.strip()
    return out


def student_start(cfg: cv.Config, strength: float) -> int:
    """Video-to-video: the first student step at or below strength * 1000."""
    ts = cv.student_timesteps(cfg).tolist()
    if not 0 < strength <= 1:
        raise cv.CausVidError(f"--strength {strength} must lie in (0, 1]")
    ok = [i for i, t in enumerate(ts) if t <= strength * 1000 + 1e-3]
    if not ok:
        raise cv.CausVidError(f"--strength {strength} is below the student's lowest step t = {ts[-1]:.0f}; "
                              f"use at least {ts[-1] / 1000:.3f}")
    return ok[0]


def check_args(args, cfg: cv.Config):
    """Everything about the flags that can be wrong, said before any model is loaded."""
    K = cfg.chunk_size
    if any(not p.strip() for p in args.prompt or []):
        raise cv.CausVidError("--prompt '' is empty; give a text prompt such as 'a red square moving left'")
    if args.samples_per_prompt < 1:
        raise cv.CausVidError(f"--samples-per-prompt {args.samples_per_prompt} must be at least 1")
    if args.teacher and (args.image or args.video or args.switch or args.window is not None):
        raise cv.CausVidError("--image, --video, --switch and --window stream with the causal student; drop --teacher")
    if args.exact_teacher and not args.teacher:
        raise cv.CausVidError("--exact-teacher replaces the teacher: add --teacher")
    if args.image and args.video:
        raise cv.CausVidError("give --image or --video, not both")
    if (args.image or args.video) and cfg.name != "tiny" and not cfg.vae:
        raise cv.CausVidError("--image / --video on Wan go through its VAE: pass --model-dir (or --vae)")
    window = cfg.num_frames if args.window is None else args.window or None
    if window is not None and (window % K or window < 2 * K):
        raise cv.CausVidError(f"--window {window} must be a multiple of the chunk size {K}, at least {2 * K} "
                              "(or 0 for an unbounded cache)")
    return window


def main(argv=None):
    args = parse_args(argv)
    cfg, device, run = utils.resolve(args)
    path = args.ckpt or (utils.teacher_path(args, run, cfg) if args.teacher else os.path.join(run, "dmd.safetensors"))
    K, window = cfg.chunk_size, check_args(args, cfg)
    inputs = utils.read_frames(args.video, cfg, "--video") if args.video else None
    given = None if inputs is None else inputs.shape[1] if cfg.name == "tiny" else wan.latent_frames(inputs.shape[1])
    num_frames = args.num_frames if args.num_frames is not None else given // K * K if given else cfg.num_frames
    if num_frames <= 0 or num_frames % K:
        raise cv.CausVidError(f"--num-frames {num_frames} must be a positive multiple of the chunk size "
                              f"{K}, e.g. {max(1, num_frames // K) * K}")
    if given is not None and given < num_frames:
        raise cv.CausVidError(f"--video has {inputs.shape[1]} frames, fewer than --num-frames {num_frames}")
    if args.no_cache and window is not None and num_frames > window:
        raise cv.CausVidError("--no-cache recomputes the whole past; use it with --window 0 or videos no longer "
                              f"than the window ({window} frames)")
    switches = parse_switches(args.switch, num_frames // K)
    start = student_start(cfg, args.strength) if args.video else 0
    image = utils.read_frames(args.image, cfg)[0, :1] if args.image else None  # (1, H, W, 3)
    out = utils.writable_dir(args.out or run, "--out")
    model = utils.load_model(path, causal=None if args.teacher else True, device=device, expect=cfg)  # teachers: their role
    kind = "student" if not args.teacher else "causal" if model.causal and not args.exact_teacher else "teacher"
    model = utils.prepare_for_inference(model, device, {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype),
                                        args.compile)
    overrides = utils.parse_overrides(args.set)  # the network is the checkpoint's; --set changes how it samples
    shape = [k for k in ARCHITECTURE if k in overrides and overrides[k] != getattr(model.cfg, k)]
    if shape:
        raise cv.CausVidError(f"--set {shape[0]}: the network's shape comes from the checkpoint "
                              f"({shape[0]}={getattr(model.cfg, shape[0])!r}); drop it")
    paths = {} if cfg.name == "tiny" else dict(text_encoder=cfg.text_encoder or model.cfg.text_encoder,
                                               vae=cfg.vae or model.cfg.vae)
    cfg = replace(model.cfg, **{**paths, **overrides})
    text_encoder = utils.text_encoder_for(path, cfg, device)
    model = utils.real_score(model, text_encoder, cfg, exact=True) if args.exact_teacher else model
    sink = cfg.sink if cfg.sink >= 0 and window is not None and num_frames + K * bool(args.image) > window else None
    if sink is not None and sink > window - 2 * K:
        raise cv.CausVidError(f"sink {sink} leaves no room for two chunks in the window {window}; lower it")
    vae = wan.WanVAE(cfg.vae, device, utils.inference_dtype(device)) if cfg.vae else None  # latents -> pixels, chunk by chunk
    base = args.prompt or toy.PROMPTS
    if inputs is not None and inputs.shape[0] > 1 and len(base) not in (1, inputs.shape[0]):
        raise cv.CausVidError(f"--video holds {inputs.shape[0]} videos: give one --prompt, or one per video")
    base = base * inputs.shape[0] if inputs is not None and inputs.shape[0] > 1 and len(base) == 1 else base
    prompts = [p for p in base for _ in range(args.samples_per_prompt)]
    mode = ("image-to-video" if args.image else f"video-to-video from t = {cv.student_timesteps(cfg)[start]:.0f}"
            if args.video else "text-to-video") + (f", prompt switches {switches}" if switches else "")
    role = "exact toy teacher" if args.exact_teacher else {"student": "causal student", "causal": "causal teacher",
                                                          "teacher": "bidirectional teacher"}[kind]
    print(f"model: {path} ({role}), {len(prompts)} videos of {num_frames} frames, {mode}, "
          f"window {window or 'unbounded'}, device {device}")

    emb = utils.embed_prompts(text_encoder, prompts + list(switches.values()) + [cfg.negative_prompt])
    text = utils.stack_text(emb, prompts, "cpu")
    if switches:  # one text per chunk: the latest switch at or before it, else the video's own prompt
        last = lambda c: max([s for s in switches if s <= c], default=None)
        text = [text if last(c) is None else emb[switches[last(c)]].expand_as(text) for c in range(num_frames // K)]
    rows = torch.arange(len(prompts)) // args.samples_per_prompt
    pixels = num_frames if vae is None else wan.pixel_frames(num_frames)  # the input frames the video takes
    video = None if inputs is None else toy.to_model_space(inputs[rows % inputs.shape[0], :pixels])
    still = None if image is None else toy.to_model_space(image).expand(K if vae is None else wan.pixel_frames(K), -1, -1, -1)
    context = None if still is None else (still if vae is None else vae.encode(still[None].to(device))[0].float().cpu()) \
        .expand(len(prompts), -1, -1, -1, -1)  # Sec. 5.3: the image, still for a chunk (Wan: encoded), is chunk 0
    batch = args.batch_size or (64 if cfg.name == "tiny" else 1)
    stem = os.path.join(out, args.name or "samples_" + os.path.splitext(os.path.basename(path))[0])
    stream = utils.stream_video(model, kind, text, cfg, num_frames, args.seed, device, emb[cfg.negative_prompt][None]
                                .to(device), context, video, start, window, sink, not args.no_cache, vae, batch)
    stamps, kept, shown, t0 = [], [], 0, time.perf_counter()  # kept: the toy world's frames (.npz, scores)
    with utils.VideoWriter([stem + ".gif", stem + ".mp4"]) as files:  # each chunk written as it arrives
        for i, chunk in enumerate(stream):
            if i or image is None:  # (with --image the first chunk is the given one: not timed, not counted)
                stamps, shown = stamps + [time.perf_counter()], shown + chunk.shape[1]
            files.append(frames := toy.to_uint8(chunk))
            kept += [frames] if cfg.name == "tiny" else []
    seconds, ms = time.perf_counter() - t0, torch.tensor([t0] + stamps).diff() * 1000
    if kept:  # the toy world's frames
        frames = torch.cat(kept, 1).numpy()  # (N, F, H, W, 3)
        np.savez(f"{stem}.npz.tmp{os.getpid()}.npz", frames=frames, prompts=np.array(prompts))
        os.replace(f"{stem}.npz.tmp{os.getpid()}.npz", f"{stem}.npz")
    later = f", then {ms[1:].median():.0f} ms a chunk (slowest {ms[1:].max():.0f})" if len(ms) > 1 else ""
    print(f"time to first chunk {ms[0] / 1000:.3f} s{later} for {len(prompts)} videos | {len(prompts) * shown / seconds:.1f} "
          f"frames/s | {seconds:.1f} s in all\nwrote {stem}.gif, {stem}.mp4" + (f", {stem}.npz" if kept else ""))
    if kept and all(p in toy.PROMPTS for p in prompts) and not (switches or args.video or args.image):
        return toy.print_scores(torch.from_numpy(frames), prompts, cfg.num_frames, args.samples_per_prompt > 1)


if __name__ == "__main__":
    utils.run_cli(main)
