"""Streaming generation with the KV cache (Sec. 4.4, Alg. 2) and the applications of Sec. 5.3-5.4.

Generates chunk by chunk with the distilled causal student (default <out>/dmd.safetensors), printing
the time to the first chunk and the frames per second, and writes
  <out>/<name>.npz   frames uint8 (N, F, H, W, 3) and prompts (N,)
  <out>/<name>.gif and .mp4   the clips in a grid, upscaled with nearest neighbour
On the toy world it also scores the samples (best-fit PSNR, prompt accuracy, diversity; per-window
PSNR for videos longer than the training length).

Modes (all through the one streaming loop, causvid.stream_generate):
  text-to-video      --prompt TEXT (repeatable: one video each; default all 48 toy prompts)
  image-to-video     --image PATH: the image, repeated to fill a chunk, is the cached first chunk
  video-to-video     --video PATH --strength S: each input chunk, as it arrives, is noised to the
                     student step nearest below S * 1000 and denoised from there (SDEdit)
  dynamic prompting  --switch CHUNK:TEXT (repeatable): from chunk CHUNK on, every video follows TEXT
  long videos        --num-frames N, any multiple of the chunk size; the cache keeps a --window of
                     frames (default: the training length) and re-encodes at positions from 0
--teacher samples the bidirectional teacher instead (many Euler steps with CFG, the whole clip at
once); --no-cache recomputes the whole prefix at every step instead of using the cache.
"""

import argparse
import os
import time
from dataclasses import replace

import numpy as np
import torch

import causvid as cv


def parse_args(argv=None):
    p = cv.add_common_args(argparse.ArgumentParser(description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--ckpt", help="checkpoint (default: <out>/dmd.safetensors, or <out>/teacher.safetensors "
                                  "with --teacher)")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several (default: all 48 toy prompts)")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="samples of each prompt (default: 1)")
    p.add_argument("--num-frames", type=int, help="frames per video, a multiple of the chunk size "
                                                  "(default: the training length; with --video, its length)")
    p.add_argument("--teacher", action="store_true", help="sample the bidirectional teacher (Euler + CFG)")
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix instead of the KV cache")
    p.add_argument("--image", help="image-to-video: the first frame (png, jpg, ...; resized if needed)")
    p.add_argument("--video", help="video-to-video: an input video (mp4, gif, or a samples .npz)")
    p.add_argument("--strength", type=float, default=0.75,
                   help="video-to-video: how much of the input is replaced, in (0, 1]; denoising starts at "
                        "the student step nearest below strength * 1000 (default: 0.75)")
    p.add_argument("--switch", action="append", default=[], metavar="CHUNK:TEXT",
                   help="dynamic prompting: from chunk CHUNK (0-based) on, use TEXT; repeatable")
    p.add_argument("--window", type=int, help="frames one chunk attends over at most (default: the "
                                              "training length; 0: unbounded)")
    p.add_argument("--name", default=None, help="output file name stem (default: samples_<model>)")
    p.add_argument("--bench", action="store_true",
                   help="benchmark instead: random weights at the preset's shapes, first-chunk latency and FPS "
                        "of the DiT (eager and torch.compile) and of the VAE, and the training memory table")
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


@torch.no_grad()
def generate(model, text, uncond, cfg: cv.Config, num_frames: int, seed: int, device, teacher=False,
             use_cache=True, context=None, video=None, start=0, window=None, vae=None):
    """-> (video (B, F, C, H, W), seconds to the first chunk, seconds in all); pixels through `vae`
    (decoded chunk by chunk as the DiT streams them) if given.

    text: (B, L, D_text) or one such tensor per chunk; context: clean frames before the video (I2V);
    video: input frames (V2V), noised chunk by chunk to student step `start` as the loop asks for them."""
    g = torch.Generator().manual_seed(seed)
    B = len(text if isinstance(text, torch.Tensor) else text[0])
    noise = torch.randn(B, num_frames, cfg.channels, cfg.height, cfg.width, generator=g).to(device)
    t0 = time.perf_counter()
    with cv.autocast(device):
        if teacher:  # the bidirectional model must generate the whole clip before showing any of it
            video = cv.sample_ode(model, noise, text, uncond, cfg.teacher_guidance, cfg.teacher_steps, cfg.shift)[0]
            video = video if vae is None else vae.decode(video.float())
            first = time.perf_counter() - t0
        else:
            timesteps = cv.student_timesteps(cfg).to(device)[start:]
            chunks = noise.split(cfg.chunk_size, 1)
            if video is not None:  # SDEdit, lazily: a chunk is noised only when the loop reaches it
                chunks = (cv.add_noise(v, n, torch.full(v.shape[:2], float(timesteps[0]), device=device))
                          for v, n in zip(video.split(cfg.chunk_size, 1), chunks))
            out = []
            stream = cv.stream_generate(model, chunks, text, timesteps, g, use_cache, context, window)
            for chunk in (stream if vae is None else vae.decode_stream(c.float() for c in stream)):
                out.append(chunk)
                if len(out) == 1:
                    first = time.perf_counter() - t0
            video = torch.cat(out, 1)
    return video.float(), first, time.perf_counter() - t0


def memory_table(cfg: cv.Config) -> str:
    """Training memory of the two stages (batch 1), computed: fp32 master weights, grads and AdamW
    state for trained models, bf16 weights for the frozen teacher; activations with gradient
    checkpointing = each block's fp32 input + one block's bf16 internals (an estimate)."""
    with torch.device("meta"):
        n = sum(p.numel() for p in cv.DiT(cfg).parameters())
    S = cfg.num_frames * (cfg.height // cfg.patch_size[1]) * (cfg.width // cfg.patch_size[2])
    act = cfg.num_layers * S * cfg.dim * 4 + S * (10 * cfg.dim + 2 * cfg.ffn_dim) * 2
    gb = lambda b: f"{b / 2**30:.1f}"
    trained, frozen = 16 * n, 2 * n  # 4 weights + 4 grads + 8 AdamW moments; bf16 weights
    rows = [("ODE regression (student trained)", trained, 0, act),
            ("DMD (generator + critic trained, teacher frozen)", 2 * trained, frozen, act)]
    lines = [f"DiT parameters: {n / 1e9:.3f} B; {S} tokens per clip ({cfg.num_frames} latent frames)",
             "| stage | weights+grads+AdamW (GB) | frozen teacher (GB) | activations, checkpointed (GB) | total (GB) |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {gb(t)} | {gb(f)} | {gb(a)} | {gb(t + f + a)} |" for name, t, f, a in rows]
    return "\n".join(lines)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def bench(cfg: cv.Config, device, num_frames: int, repeats: int = 3):
    """Random weights at the preset's shapes: the DiT's streaming latency/FPS (eager, then compiled)
    and the VAE's decode, separately."""
    print(memory_table(cfg))
    model = cv.DiT(cfg, causal=True).to(device).eval()
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device=device)
    ts = cv.student_timesteps(cfg).to(device)
    pixels = 1 + 4 * (num_frames - 1) if cfg.vae or cfg.name != "tiny" else num_frames  # Wan VAE: 4x in time
    for label in ["eager", "torch.compile"]:
        if label == "torch.compile":
            for block in model.blocks:
                block.compile()
        times = []
        for r in range(repeats + 1):  # the first run warms up (and compiles)
            noise = torch.randn(1, num_frames, cfg.channels, cfg.height, cfg.width, device=device)
            sync(device)
            t0, first = time.perf_counter(), None
            with cv.autocast(device):
                for chunk in cv.stream_generate(model, noise, text, ts):
                    sync(device)
                    first = first or time.perf_counter() - t0
            sync(device)
            times.append((first, time.perf_counter() - t0))
        first, total = np.median([t[0] for t in times[1:]]), np.median([t[1] for t in times[1:]])
        print(f"DiT {label}: first chunk {first:.3f} s | {pixels / total:.1f} frames/s "
              f"({num_frames} latent frames, {total:.2f} s)")
    if cfg.name == "tiny":
        return
    from diffusers import AutoencoderKLWan  # Wan's default config is the real VAE's

    vae = cv.WanVAE(cfg.vae or AutoencoderKLWan(), device)  # without weights: random, at Wan's shapes
    z = torch.randn(1, num_frames, cfg.channels, cfg.height, cfg.width, device=device)
    times = []
    for r in range(repeats + 1):
        sync(device)
        t0, first = time.perf_counter(), None
        with cv.autocast(device):
            for _ in vae.decode_stream(z.split(cfg.chunk_size, 1)):
                sync(device)
                first = first or time.perf_counter() - t0
        times.append((first, time.perf_counter() - t0))
    first, total = np.median([t[0] for t in times[1:]]), np.median([t[1] for t in times[1:]])
    print(f"VAE decode: first chunk {first:.3f} s | {pixels / total:.1f} frames/s")


def main(argv=None):
    args = parse_args(argv)
    cfg, device, out = cv.resolve_common(args)
    if args.bench:
        return bench(cfg, device, args.num_frames or cfg.num_frames)
    path = args.ckpt or os.path.join(out, "teacher.safetensors" if args.teacher else "dmd.safetensors")
    K = cfg.chunk_size
    blank = [p for p in args.prompt or [] if not p.strip()]
    if blank:
        raise cv.CausVidError(f"--prompt {blank[0]!r} is empty; give a text prompt such as 'a red square moving left'")
    if args.samples_per_prompt < 1:
        raise cv.CausVidError(f"--samples-per-prompt {args.samples_per_prompt} must be at least 1")
    if args.teacher and (args.image or args.video or args.switch or args.window is not None):
        raise cv.CausVidError("--image, --video, --switch and --window stream with the causal student; drop --teacher")
    if args.image and args.video:
        raise cv.CausVidError("give --image or --video, not both")
    if (args.image or args.video) and cfg.name != "tiny":
        raise cv.CausVidError("--image / --video need the Wan VAE to encode the input, which sample.py does not "
                              "load yet; use them with --tiny")
    window = cfg.num_frames if args.window is None else args.window or None
    if window is not None and (window % K or window < 2 * K):
        raise cv.CausVidError(f"--window {window} must be a multiple of the chunk size {K}, at least {2 * K} "
                              "(or 0 for an unbounded cache)")
    inputs = cv.read_frames(args.video, cfg.height, cfg.width) if args.video else None
    if inputs is not None and args.num_frames is None:
        args.num_frames = inputs.shape[1] // K * K
    num_frames = cfg.num_frames if args.num_frames is None else args.num_frames
    if num_frames <= 0 or num_frames % K:
        raise cv.CausVidError(f"--num-frames {num_frames} must be a positive multiple of the chunk size "
                              f"{K}, e.g. {max(1, num_frames // K) * K}")
    if inputs is not None and inputs.shape[1] < num_frames:
        raise cv.CausVidError(f"--video has {inputs.shape[1]} frames, fewer than --num-frames {num_frames}")
    switches = parse_switches(args.switch, num_frames // K)
    start = student_start(cfg, args.strength) if args.video else 0
    image = cv.read_frames(args.image, cfg.height, cfg.width)[0, :1] if args.image else None  # (1, H, W, 3)

    model = cv.load_model(path, causal=not args.teacher, device=device, expect=cfg).eval()
    # the network comes from the checkpoint; --set may change how it samples (steps, guidance, ...)
    overrides = cv.parse_overrides(args.set)
    shape = [k for k in ARCHITECTURE if k in overrides and overrides[k] != getattr(model.cfg, k)]
    if shape:
        raise cv.CausVidError(f"--set {shape[0]}: the network's shape comes from the checkpoint "
                              f"({shape[0]}={getattr(model.cfg, shape[0])!r}); drop it")
    paths = {} if cfg.name == "tiny" else dict(text_encoder=cfg.text_encoder or model.cfg.text_encoder,
                                               vae=cfg.vae or model.cfg.vae)
    cfg = replace(model.cfg, **{**paths, **overrides})
    text_encoder = cv.text_encoder_for(path, cfg, cv.text_dtype(device)).to(device)
    if args.teacher:  # --set exact_teacher=true: the toy world's exact denoiser instead (a clip of the world)
        model = cv.teacher_role(model, text_encoder, cfg)
    vae = cv.WanVAE(cfg.vae, device) if cfg.vae else None  # latents -> pixels, chunk by chunk
    base = args.prompt or cv.PROMPTS
    if inputs is not None and inputs.shape[0] > 1 and len(base) not in (1, inputs.shape[0]):
        raise cv.CausVidError(f"--video holds {inputs.shape[0]} videos: give one --prompt, or one per video")
    if inputs is not None and inputs.shape[0] > 1 and len(base) == 1:
        base = base * inputs.shape[0]
    prompts = [p for p in base for _ in range(args.samples_per_prompt)]
    batch = args.batch_size or (64 if cfg.name == "tiny" else 1)
    mode = ("image-to-video" if args.image else f"video-to-video from t = {cv.student_timesteps(cfg)[start]:.0f}"
            if args.video else "text-to-video") + (f", prompt switches {switches}" if switches else "")
    role = ("causal student" if not args.teacher else "exact toy teacher" if cfg.exact_teacher
            else "bidirectional teacher")
    print(f"model: {path} ({role}), {len(prompts)} "
          f"videos of {num_frames} frames, {mode}, window {window or 'unbounded'}, device {device}")

    emb = cv.embed_prompts(text_encoder, prompts + list(switches.values()) + [cfg.negative_prompt])
    uncond = emb[cfg.negative_prompt][None].to(device)
    videos, firsts, total = [], [], 0.0
    for i in range(0, len(prompts), batch):
        part = prompts[i:i + batch]
        text = torch.stack([emb[p] for p in part]).to(device)
        if switches:  # one text per chunk: the latest switch at or before it, else the video's prompt
            per_chunk = []
            for c in range(num_frames // K):
                last = max([s for s in switches if s <= c], default=None)
                per_chunk.append(text if last is None else emb[switches[last]].expand_as(text).to(device))
            text = per_chunk
        context = video = None
        if image is not None:  # Sec. 5.3: the image, repeated to a chunk, is the first (cached) chunk
            context = cv.to_model_space(image).expand(len(part), K, -1, -1, -1).to(device)
        if inputs is not None:
            rows = torch.arange(i, i + len(part)) // args.samples_per_prompt % inputs.shape[0]
            video = cv.to_model_space(inputs[rows, :num_frames]).to(device)
        sample, first, seconds = generate(model, text, uncond, cfg, num_frames, args.seed + i, device, args.teacher,
                                          not args.no_cache, context, video, start, window, vae)
        if context is not None:
            sample = torch.cat([context.float(), sample], 1)  # the given chunk leads the video
        videos.append(sample.cpu())
        firsts.append(first)
        total += seconds
    frames = cv.to_uint8(torch.cat(videos)).numpy()  # (N, F, H, W, 3)
    shown = frames.shape[1] - (K if image is not None else 0)  # generated frames (pixels, after a VAE)
    print(f"time to first chunk {np.mean(firsts):.3f} s (batch of {min(batch, len(prompts))}) | "
          f"{len(prompts) * shown / total:.1f} frames/s | {total:.1f} s in all")

    stem = os.path.join(out, args.name or "samples_" + os.path.splitext(os.path.basename(path))[0])
    tmp = f"{stem}.npz.tmp{os.getpid()}.npz"
    np.savez(tmp, frames=frames, prompts=np.array(prompts))
    os.replace(tmp, f"{stem}.npz")
    for ext in (".gif", ".mp4"):
        cv.write_video(stem + ext, torch.from_numpy(frames))
    print(f"wrote {stem}.npz, {stem}.gif, {stem}.mp4")

    if cfg.name == "tiny" and all(p in cv.PROMPTS for p in prompts) and not (switches or args.video or args.image):
        s = cv.score_toy(torch.from_numpy(frames[:, :cfg.num_frames]), prompts)
        diversity = f"{s['diversity']:.2f}" if args.samples_per_prompt > 1 else "n/a (one sample per prompt)"
        print(f"toy-world score (first {cfg.num_frames} frames): best-fit PSNR {s['best_fit_psnr']:.2f} dB | "
              f"prompt accuracy {100 * s['prompt_accuracy']:.1f}% | diversity {diversity} | "
              f"steady 1-px motion {100 * s['steady_motion']:.1f}% of frame steps")
        print("frame steps along the prompt's axis: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in s["motion_steps"].items()))
        if not all(s["per_sample_correct"]):
            print(f"wrong prompt fits best for {int((~s['per_sample_correct']).sum())} of {len(prompts)}; they got wrong: "
                  + ", ".join(f"{k} {v}" for k, v in s["errors"].items()))
        if num_frames > cfg.num_frames:
            s["window_psnr"] = cv.window_psnr(torch.from_numpy(frames), prompts, cfg.num_frames)
            print("per-window best-fit PSNR: " + " ".join(f"{v:.1f}" for v in s["window_psnr"].mean(0).tolist()))
        return s


if __name__ == "__main__":
    cv.run_cli(main)
