"""Streaming generation with the KV cache (Sec. 4.4, Alg. 2).

Generates chunk by chunk with the distilled causal student (default <out>/dmd.safetensors), printing
the time to the first chunk and the frames per second, and writes
  <out>/<name>.npz   frames uint8 (N, F, H, W, 3) and prompts (N,)
  <out>/<name>.gif and .mp4   the clips in a grid, upscaled with nearest neighbour
On the toy world it also scores the samples (best-fit PSNR, prompt accuracy, diversity).
--teacher samples the bidirectional teacher instead (many Euler steps with CFG, the whole clip at
once); --no-cache recomputes the whole prefix at every step instead of using the cache.
"""

import argparse
import os
import time

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
                                                  "(default: the training length)")
    p.add_argument("--teacher", action="store_true", help="sample the bidirectional teacher (Euler + CFG)")
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix instead of the KV cache")
    p.add_argument("--name", default=None, help="output file name stem (default: samples_<model>)")
    return p.parse_args(argv)


@torch.no_grad()
def generate(model, text, uncond, cfg: cv.Config, num_frames: int, seed: int, device, teacher=False,
             use_cache=True):
    """-> (video (B, F, C, H, W), seconds to the first chunk, seconds in all)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(text), num_frames, cfg.channels, cfg.height, cfg.width, generator=g).to(device)
    t0 = time.perf_counter()
    with cv.autocast(device):
        if teacher:  # the bidirectional model must generate the whole clip before showing any of it
            video = cv.sample_ode(model, noise, text, uncond, cfg.teacher_guidance, cfg.teacher_steps, cfg.shift)[0]
            first = time.perf_counter() - t0
        else:
            chunks = []
            for chunk in cv.stream_generate(model, noise, text, cv.student_timesteps(cfg).to(device), g, use_cache):
                chunks.append(chunk)
                if len(chunks) == 1:
                    first = time.perf_counter() - t0
            video = torch.cat(chunks, 1)
    return video.float(), first, time.perf_counter() - t0


def main(argv=None):
    args = parse_args(argv)
    cfg, device, out = cv.resolve_common(args)
    path = args.ckpt or os.path.join(out, "teacher.safetensors" if args.teacher else "dmd.safetensors")
    num_frames = cfg.num_frames if args.num_frames is None else args.num_frames
    if num_frames <= 0 or num_frames % cfg.chunk_size:
        raise cv.CausVidError(f"--num-frames {num_frames} must be a positive multiple of the chunk size "
                              f"{cfg.chunk_size}, e.g. {max(1, num_frames // cfg.chunk_size) * cfg.chunk_size}")
    blank = [p for p in args.prompt or [] if not p.strip()]
    if blank:
        raise cv.CausVidError(f"--prompt {blank[0]!r} is empty; give a text prompt such as 'a red square moving left'")
    if args.samples_per_prompt < 1:
        raise cv.CausVidError(f"--samples-per-prompt {args.samples_per_prompt} must be at least 1")
    model = cv.load_model(path, causal=not args.teacher, device=device, expect=cfg).eval()
    cfg = model.cfg
    text_encoder = cv.load_text_encoder(path).to(device)
    prompts = [p for p in (args.prompt or cv.PROMPTS) for _ in range(args.samples_per_prompt)]
    batch = args.batch_size or 64
    print(f"model: {path} ({'bidirectional teacher' if args.teacher else 'causal student'}), {len(prompts)} "
          f"videos of {num_frames} frames, device {device}")

    emb = cv.embed_prompts(text_encoder, prompts + [cfg.negative_prompt])
    uncond = emb[cfg.negative_prompt][None].to(device)
    videos, firsts, total = [], [], 0.0
    for i in range(0, len(prompts), batch):
        text = torch.stack([emb[p] for p in prompts[i:i + batch]]).to(device)
        video, first, seconds = generate(model, text, uncond, cfg, num_frames, args.seed + i, device, args.teacher,
                                         not args.no_cache)
        videos.append(video.cpu())
        firsts.append(first)
        total += seconds
    frames = cv.to_uint8(torch.cat(videos)).numpy()  # (N, F, H, W, 3)
    print(f"time to first chunk {np.mean(firsts):.3f} s (batch of {min(batch, len(prompts))}) | "
          f"{len(prompts) * num_frames / total:.1f} frames/s | {total:.1f} s in all")

    stem = os.path.join(out, args.name or "samples_" + os.path.splitext(os.path.basename(path))[0])
    os.makedirs(out, exist_ok=True)
    tmp = f"{stem}.npz.tmp{os.getpid()}.npz"
    np.savez(tmp, frames=frames, prompts=np.array(prompts))
    os.replace(tmp, f"{stem}.npz")
    for ext in (".gif", ".mp4"):
        cv.write_video(stem + ext, torch.from_numpy(frames))
    print(f"wrote {stem}.npz, {stem}.gif, {stem}.mp4")

    if cfg.name == "tiny" and all(p in cv.PROMPTS for p in prompts) and num_frames == cfg.num_frames:
        s = cv.score_toy(torch.from_numpy(frames), prompts)
        print(f"toy-world score: best-fit PSNR {s['best_fit_psnr']:.2f} dB | prompt accuracy "
              f"{100 * s['prompt_accuracy']:.1f}% | diversity {s['diversity']:.2f}")
        return s


if __name__ == "__main__":
    cv.run_cli(main)
