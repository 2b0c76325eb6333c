"""The device check: random weights at a preset's shapes, no checkpoint needed.

    python bench.py --config wan2.1-t2v-1.3b --device cuda     # one GPU
    python bench.py --tiny --device cpu                         # the same code at toy size

Prints the DiT's streaming latency and throughput (eager, then each block compiled), the VAE's
decode, and the computed training-memory table.
"""

import argparse
import time

import numpy as np
import torch

import causvid as cv
import utils
import wan


def parse_args(argv=None):
    p = utils.add_common_args(argparse.ArgumentParser(description=__doc__,
                                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--num-frames", type=int, help="latent frames per video (default: the preset's)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (default: 3)")
    return p.parse_args(argv)


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
             "| stage | weights+grads+AdamW (GiB) | frozen teacher (GiB) | activations, checkpointed (GiB) | total (GiB) |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {gb(t)} | {gb(f)} | {gb(a)} | {gb(t + f + a)} |" for name, t, f, a in rows]
    return "\n".join(lines)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(run, device, repeats: int) -> tuple[float, float]:
    """Median (seconds to the first chunk, seconds in all) of `repeats` runs after one warm-up; run()
    yields chunks."""
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t0, first = time.perf_counter(), None
        for _ in run():
            sync(device)
            first = first or time.perf_counter() - t0
        sync(device)
        times.append((first, time.perf_counter() - t0))
    return float(np.median([t[0] for t in times[1:]])), float(np.median([t[1] for t in times[1:]]))


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    cfg, device, _ = utils.resolve(args)
    num_frames = args.num_frames or cfg.num_frames
    print(memory_table(cfg))
    model = cv.DiT(cfg, causal=True).to(device).eval()
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device=device)
    ts = cv.student_timesteps(cfg).to(device)
    pixels = 1 + 4 * (num_frames - 1) if cfg.name != "tiny" else num_frames  # Wan's VAE: 4x in time
    noise = lambda: torch.randn(1, num_frames, cfg.channels, cfg.height, cfg.width, device=device)
    for label in ["eager", "torch.compile"]:
        if label == "torch.compile":
            for block in model.blocks:
                block.compile()
        with utils.autocast(device):
            first, total = timed(lambda: cv.stream_generate(model, noise(), text, ts), device, args.repeats)
        print(f"DiT {label}: first chunk {first:.3f} s | {pixels / total:.1f} frames/s "
              f"({num_frames} latent frames, {total:.2f} s)")
    if cfg.name == "tiny":
        return
    from diffusers import AutoencoderKLWan  # Wan's default config is the real VAE's

    vae = wan.WanVAE(cfg.vae or AutoencoderKLWan(), device)  # without weights: random, at Wan's shapes
    with utils.autocast(device):
        first, total = timed(lambda: vae.decode_stream(noise().split(cfg.chunk_size, 1)), device, args.repeats)
    print(f"VAE decode: first chunk {first:.3f} s | {pixels / total:.1f} frames/s")


if __name__ == "__main__":
    utils.run_cli(main)
