"""The device check: random weights at a preset's shapes, no checkpoint, one table.

    python bench.py --config wan2.1-t2v-1.3b --device cuda     # one GPU, a few minutes
    python bench.py --tiny --device cpu                         # the same code at toy size
    python bench.py --tiny --profile                            # where the toy pipeline's time goes

Inference: the DiT streaming a video with the KV cache (Alg. 2) in bf16 weights, eager and with
each block compiled; then end to end, each chunk decoded by the VAE as soon as the DiT makes it
(Wan only); then with chunk 0 made by a causal teacher's sampler (the bound on a better first
chunk, successors.py; --skip bound leaves it out). --set first_chunk_step_indices=... gives chunk
0 steps of its own.
Training: one ODE-regression step and one DMD iteration (the generator's turn, then a critic-only
one), at batch 1, with the scripts' own step functions. Peak memory is
torch.cuda.max_memory_allocated on a GPU (GB = 10^9 bytes), the process's peak RSS on a CPU (an
upper bound: it never goes down).
"""

import argparse
import copy
import dataclasses
import functools
import math
import os
import resource
import shutil
import tempfile
import time

import numpy as np
import torch

import causvid as cv
import successors
import train_dmd
import train_ode
import training
import utils
import wan


def parse_args(argv=None):
    p = utils.add_common_args(
        argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    )
    p.add_argument("--num-frames", type=int, help="latent frames per video (default: the preset's)")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs after one warm-up (default: 3)"
    )
    p.add_argument(
        "--skip",
        choices=["compile", "training", "bound"],
        action="append",
        default=[],
        help="leave a part out",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead: where `train_dmd.py --tiny`'s time goes, phase by phase (docs/speed.md)",
    )
    return p.parse_args(argv)


def attention_flops(cfg: cv.Config, q_frames: int, kv_frames: int) -> int:
    """FLOPs (2 x multiply-adds) of one DiT forward of q_frames attending over kv_frames: the linear
    layers, self- and cross-attention; embeddings and head are negligible."""
    N = (cfg.height // cfg.patch_size[1]) * (cfg.width // cfg.patch_size[2])
    Sq, Skv, D, L = q_frames * N, kv_frames * N, cfg.dim, cfg.text_len
    per_layer = 2 * (
        4 * Sq * D * D
        + 2 * Sq * Skv * D  # self-attention: q, k, v, o and QK^T, AV
        + 2 * Sq * D * D
        + 2 * L * D * D
        + 2 * Sq * L * D  # cross-attention
        + 2 * Sq * D * cfg.ffn_dim
    )  # FFN
    return cfg.num_layers * per_layer


def stream_flops(cfg: cv.Config, frames: int) -> int:
    """One streamed video: Q steps per chunk (chunk 0's own where it has them) over the cache +
    itself, and each finished chunk but the last written to the cache."""
    K, Q = cfg.chunk_size, len(cfg.student_step_indices)
    Q0 = len(cfg.first_chunk_step_indices or cfg.student_step_indices)
    return sum(
        ((Q0 if c == 0 else Q) + (c + 1 < frames // K)) * attention_flops(cfg, K, (c + 1) * K)
        for c in range(frames // K)
    )


def parameters(cfg: cv.Config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in cv.DiT(cfg).parameters())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 1e9:.1f} GB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB RSS"


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(run, device, repeats: int) -> tuple[float, float]:
    """Median (seconds to the first chunk, seconds in all) of `repeats` runs after one warm-up."""
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t0, first = time.perf_counter(), None
        for _ in run():
            sync(device)
            first = first or time.perf_counter() - t0
        times.append((first, time.perf_counter() - t0))
    return float(np.median([t[0] for t in times[1:]])), float(np.median([t[1] for t in times[1:]]))


@torch.no_grad()
def inference(cfg: cv.Config, device, frames: int, args, rows: list):
    model = utils.prepare_for_inference(cv.DiT(cfg, causal=True), device)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device=device)
    ts = successors.chunk_schedule(cfg, device)  # (--set first_chunk_step_indices=...)
    pixels = 1 + 4 * (frames - 1) if cfg.name != "tiny" else frames  # Wan's VAE: 4x in time

    def noise():
        return torch.randn(1, frames, cfg.channels, cfg.height, cfg.width, device=device)

    def stream():
        return cv.stream_generate(model, noise(), text, ts)

    vae = None
    if cfg.name != "tiny":
        from diffusers import AutoencoderKLWan  # Wan's default config is the real VAE's

        torch.backends.cudnn.benchmark = True
        vae = wan.WanVAE(
            cfg.vae or AutoencoderKLWan(), device, utils.inference_dtype(device)
        )  # random weights

    def bound_row():  # the bound on a better first chunk: a causal teacher's sampler makes it
        by_teacher = successors.teacher_first_chunk(
            model, text, cfg.teacher_guidance, cfg.teacher_steps, cfg.shift
        )
        bound = functools.partial(
            successors.first_chunk_generate, first=by_teacher, then=cv.stream_generate
        )
        reset_peak(device)
        first_chunk, total = timed(lambda: bound(model, noise(), text, ts), device, args.repeats)
        return [
            f"chunk 0 by a causal teacher ({cfg.teacher_steps} steps, CFG), eager",
            f"{first_chunk:.3f} s",
            f"{pixels / total:.1f} frames/s",
            "",
            peak_memory(device),
        ]

    bound = None  # (timed eager, before the blocks are compiled; shown after the stream's rows)
    for label in ["eager"] + ["compiled"] * ("compile" not in args.skip):
        if label == "compiled":
            if "bound" not in args.skip:
                bound = bound_row()
            utils.prepare_for_inference(model, device, compile=True)
        reset_peak(device)
        first, total = timed(stream, device, args.repeats)
        tflops = stream_flops(cfg, frames) / total / 1e12
        rows.append(
            [
                f"DiT streaming, {label}",
                f"{first:.3f} s",
                f"{pixels / total:.1f} frames/s",
                f"{tflops:.3g} TFLOP/s",
                peak_memory(device),
            ]
        )
        if vae is not None:
            first, total = timed(lambda: vae.decode_stream(stream()), device, args.repeats)
            rows.append(
                [
                    f"DiT + VAE, {label}, end to end",
                    f"{first:.3f} s",
                    f"{pixels / total:.1f} frames/s",
                    "",
                    peak_memory(device),
                ]
            )
    if bound is None and "bound" not in args.skip:
        bound = bound_row()
    rows.extend([bound] if bound else [])


def training_steps(cfg: cv.Config, device, rows: list):
    """One ODE step and one DMD iteration of each kind, at batch 1 and the preset's shapes."""
    cfg = dataclasses.replace(cfg, batch_size=1)
    Q, g = len(cfg.student_step_indices), torch.Generator().manual_seed(0)

    def clip(*lead):
        return torch.randn(
            *lead, cfg.num_frames, cfg.channels, cfg.height, cfg.width, generator=g
        ).to(device)

    text = torch.randn(1, cfg.text_len, cfg.text_dim, device=device)
    timesteps = cv.student_timesteps(cfg).to(device)

    def student():
        model = cv.DiT(cfg, causal=True).to(device).train()
        model.gradient_checkpointing = cfg.gradient_checkpointing
        return model

    def measure(label, step):
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        rows.append(
            [label, "", f"{time.perf_counter() - t0:.2f} s / step", "", peak_memory(device)]
        )

    model = student()
    streams = training.Streams(0, cfg.accumulate)
    opt = training.adamw(model.parameters(), cfg.lr_ode, device)

    def ode_step():
        train_ode.ode_step(model, opt, lambda g: (clip(1, Q + 1), text), timesteps, cfg, streams)

    ode_step()  # warm-up: the optimizer's state
    measure("ODE regression step", ode_step)
    model = None  # the ODE student and its optimizer are released before the DMD part
    opt = None
    generator = student()
    critic = cv.DiT(cfg).to(device).train()
    teacher = copy.deepcopy(critic).eval().requires_grad_(False).to(utils.inference_dtype(device))
    critic.gradient_checkpointing = cfg.gradient_checkpointing
    s = train_dmd.DMD(
        generator=generator,
        critic=critic,
        real=teacher,
        opt_g=training.adamw(generator.parameters(), cfg.lr_generator, device),
        opt_c=training.adamw(critic.parameters(), cfg.lr_critic, device),
        videos=lambda g: (clip(1), text),
        generator_input=train_dmd.generator_inputs(cfg, device, seed=0),
        uncond=text,
        timesteps=timesteps,
        streams=streams,
        cfg=cfg,
        device=device,
    )
    train_dmd.dmd_iteration(0, s)  # warm-up: both optimizers' state
    measure("DMD iteration, generator + critic", lambda: train_dmd.dmd_iteration(0, s))
    measure("DMD iteration, critic only", lambda: train_dmd.dmd_iteration(1, s))


# torch.profiler's op names -> the kind of work; every other op is elementwise or a norm, and the
# wall time no op covers is Python and dispatch
KINDS = {
    "matmuls": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("aten::_scaled_dot_product", "aten::_flash_attention"),
    "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::clone"),
    "optimizer": ("aten::_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt"),
}


def kind_of(op: str) -> str:
    return next((k for k, names in KINDS.items() if op.startswith(names)), "elementwise and norms")


def profile_phases(cfg: cv.Config, device, repeats: int):
    """The toy pipeline's steps at the preset's own batch sizes, each under torch.profiler after a
    warm-up: seconds per step (timed without the profiler), how many steps a run takes, and each
    kind of work's share of the profiled wall time. The shipped toy teacher's weights."""
    from torch.profiler import ProfilerActivity, profile

    world = utils.make_world(cfg, device)
    B, Q, g = cfg.batch_size, len(cfg.student_step_indices), torch.Generator().manual_seed(0)
    text = torch.randn(B, cfg.text_len, cfg.text_dim, device=device)
    timesteps = cv.student_timesteps(cfg).to(device)
    teacher = utils.load_model(world.pretrained_teacher, device=device, expect=cfg)
    teacher = teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    student.causal = True
    critic = copy.deepcopy(teacher).train().requires_grad_(True)
    streams = training.Streams(0, cfg.accumulate)
    opt = training.adamw(student.parameters(), cfg.lr_ode, device)
    pairs = torch.randn(B, Q + 1, cfg.num_frames, cfg.channels, cfg.height, cfg.width, generator=g)
    P = world.pairs_batch  # the ODE pairs: one Euler step of a shard, CFG in one forward
    x = torch.randn(P, cfg.num_frames, cfg.channels, cfg.height, cfg.width, generator=g)
    pair_text = torch.randn(P, cfg.text_len, cfg.text_dim, device=device)

    @torch.no_grad()
    def euler_step():
        with utils.autocast(device, training=True):
            t = torch.full((P, cfg.num_frames), 500.0, device=device)
            cv.guided_velocity(teacher, x, t, pair_text, text[:1], cfg.teacher_guidance)

    def ode_step():
        train_ode.ode_step(student, opt, lambda rng: (pairs, text), timesteps, cfg, streams)

    s = train_dmd.DMD(
        generator=student,
        critic=critic,
        real=teacher,
        opt_g=opt,
        opt_c=training.adamw(critic.parameters(), cfg.lr_critic, device),
        videos=lambda rng: (world.clips(B, rng)[0], text),  # rendered toy clips, as in a run
        generator_input=train_dmd.generator_inputs(cfg, device, seed=0),
        uncond=text[:1],
        timesteps=timesteps,
        streams=streams,
        cfg=cfg,
        device=device,
    )
    turns = cfg.dmd_steps // cfg.critic_updates_per_generator
    steps = train_ode.pair_schedule(cfg)[0] * math.ceil(cfg.ode_pairs / P)
    phases = [
        ("ODE pairs: an Euler step of a shard", euler_step, steps),
        ("ODE regression step", ode_step, cfg.ode_steps),
        ("DMD iteration, generator + critic", lambda: train_dmd.dmd_iteration(0, s), turns),
        (
            "DMD iteration, critic only",
            lambda: train_dmd.dmd_iteration(1, s),
            cfg.dmd_steps - turns,
        ),
    ]
    kinds = [*KINDS, "elementwise and norms", "Python and dispatch"]
    lines = [
        f"| step (batch {B}; pairs {P}) | s / step | x steps = s / run | "
        + " | ".join(kinds)
        + " |",
        "|---" * (len(kinds) + 3) + "|",
    ]
    for label, step, count in phases:
        step()  # warm-up (the optimizers' state)
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        wall = (time.perf_counter() - t0) / repeats  # without the profiler's own overhead
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(repeats):
                step()
            profiled = (time.perf_counter() - t0) / repeats
        share = dict.fromkeys(kinds, 0.0)
        for e in prof.key_averages():
            share[kind_of(e.key)] += e.self_cpu_time_total / 1e6 / repeats
        share["Python and dispatch"] = profiled - sum(share.values())
        cells = [f"{100 * max(0.0, v) / profiled:.0f}%" for v in share.values()]
        lines.append(
            f"| {label} | {wall:.3f} | {count} = {wall * count:.0f} s | " + " | ".join(cells) + " |"
        )
    print("\n".join(lines))
    encoder = world.text_encoder()
    path = os.path.join(tempfile.mkdtemp(), "bench.safetensors")
    outside = [
        ("render a batch of toy clips (DMD's videos)", lambda: world.clips(B, g)),
        ("embed the 48 prompts (once per stage)", lambda: encoder.embed(world.prompts)),
        ("write a checkpoint (once per stage)", lambda: training.save_model(path, critic, encoder)),
    ]
    for label, step in outside:
        step()
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        lines.append(f"{label}: {(time.perf_counter() - t0) / repeats:.3f} s")
        print(lines[-1])
    shutil.rmtree(os.path.dirname(path))
    return lines


def main(argv=None):
    args = parse_args(argv)
    cfg, device, _ = utils.resolve(args)
    if args.profile:
        if cfg.name != "tiny" or device.type != "cpu":
            raise cv.CausVidError(
                "--profile measures the toy pipeline on a CPU: pass --tiny (and no --device cuda)"
            )
        return profile_phases(cfg, device, args.repeats)
    rows = []
    inference(cfg, device, args.num_frames or cfg.num_frames, args, rows)
    if "training" not in args.skip:
        training_steps(cfg, device, rows)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"\n{cfg.name} ({parameters(cfg) / 1e9:.3f} B parameters) on {name}, "
        f"torch {torch.__version__}, random weights, batch 1\n"
    )
    lines = ["| | first chunk | throughput | compute | peak memory |", "|---|---|---|---|---|"]
    print("\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]))
    return rows


if __name__ == "__main__":
    utils.run_cli(main)
