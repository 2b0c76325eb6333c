"""The evidence study: the paper's Table 4, Fig. 8 and Table 3 in miniature on the toy world, plus
the applications of Sec. 5.3-5.4 (image-to-video, video-to-video, dynamic prompting), measured.

    python study.py --tiny --run-dir runs/tiny      # after train_dmd.py --tiny

Trains the baselines of Table 4 and Fig. 8 that are missing from the run (each is saved and reused):
  the causal teacher            causal_ode_init's: weights/toy_causal_teacher.safetensors, or with
                                --causal-teacher-steps N <run>/causal_diffusion.safetensors, the
                                teacher fine-tuned with the block-causal mask by teacher forcing: a
                                many-step causal diffusion model, sampled chunk by chunk with CFG
  dmd_no_ode/dmd.safetensors    DMD with the generator initialised from the teacher,
                                not from stage 1
  dmd_causal_teacher/dmd.safetensors   DMD with the causal diffusion model as the real score
then prints markdown tables and writes <run>/study/{results.md, fig8.png, *.gif}. `onestep` runs
each student step once on the teacher's own trajectories (<run>/ode_pairs and new ones in
<run>/study/): where the error is made (docs/experiments.md).
`--only train --only successors` trains only the successors' students instead (docs/successors.md).
"""

import argparse
import dataclasses
import glob
import json
import os
import shutil
import time

import numpy as np
import torch

import causvid as cv
import toy_world as toy
import train_dmd
import train_ode
import training
import utils
from bench import attention_flops

PARTS = ["train", "table4", "fig8", "table3", "apps", "onestep", "successors", "long", "dmdlog"]


def parse_args(argv=None):
    p = utils.add_common_args(
        argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    )
    p.add_argument(
        "--seeds", type=int, default=4, help="samples per prompt for Table 4 (default: 4)"
    )
    p.add_argument(
        "--long-frames", type=int, default=48, help="frames of the Fig. 8 videos (default: 48)"
    )
    p.add_argument(
        "--causal-teacher-steps",
        type=int,
        help="train the causal teacher into the run for this many "
        "steps (default: the run's, else the one shipped in weights/)",
    )
    p.add_argument(
        "--dmd-steps",
        type=int,
        help="DMD iterations of the two ablation runs (default: the preset's)",
    )
    p.add_argument(
        "--only",
        choices=PARTS,
        action="append",
        help="run only these parts (repeatable; default: all)",
    )
    p.add_argument(
        "--teacher",
        help="the bidirectional teacher (default: <run>/teacher.safetensors, else the shipped one)",
    )
    p.add_argument(
        "--long-video",
        type=int,
        default=240,
        help="frames of the rolling-cache comparison (default: 240)",
    )
    p.add_argument(
        "--num-prompts", type=int, default=48, help="use the first N toy prompts (default: all 48)"
    )
    p.add_argument("--resume", action="store_true", help="continue interrupted baseline training")
    p.add_argument(
        "--save-every", type=int, default=500, help="steps between saves of the resumable state"
    )
    p.add_argument(
        "--log-every", type=int, default=100, help="steps between log lines (default: 100)"
    )
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The baselines
# ---------------------------------------------------------------------------------------------


def train_missing(args, world, run, teacher):
    """The causal diffusion model (causal_ode_init's teacher: the run's, the shipped one, or one
    trained here by teacher forcing) and the two DMD ablations."""
    ode = os.path.join(run, "ode.safetensors")
    for path in (teacher, ode):
        if not os.path.exists(path):
            raise cv.CausVidError(
                f"{path!r} not found; run `python train_dmd.py --tiny --run-dir {run}` first"
            )
    causal = utils.causal_teacher_path(args, run, world)
    if not os.path.exists(causal):  # the same model as causal_ode_init's teacher
        torch.manual_seed(args.seed)
        bidirectional = utils.load_model(teacher, device=world.device)
        train_ode.get_causal_teacher(args, world, bidirectional, world.text_encoder(teacher), run)
    common = ["--tiny", "--seed", str(args.seed), "--save-every", str(args.save_every)] + [
        "--resume"
    ] * args.resume
    common += ["--no-scorecard"]  # (the study scores every model itself)
    common += [a for item in args.set for a in ("--set", item)]
    common += ["--steps", str(args.dmd_steps)] if args.dmd_steps else []
    common += ["--device", args.device] if args.device else []
    common += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    for name, init, real in [("dmd_no_ode", teacher, teacher), ("dmd_causal_teacher", ode, causal)]:
        if not os.path.exists(os.path.join(run, name, "dmd.safetensors")):
            train_dmd.main(
                common + ["--run-dir", os.path.join(run, name), "--ode", init, "--teacher", real]
            )


# ---------------------------------------------------------------------------------------------
# Sampling every model the same way
# ---------------------------------------------------------------------------------------------


def models(teacher, causal):
    """(label, checkpoint (relative to the run), how it samples) for every row of Table 4."""
    return [
        ("bidirectional teacher (Euler + CFG)", teacher, "teacher"),
        ("causal diffusion model (teacher forcing, Euler + CFG)", causal, "causal"),
        ("4-step student, ODE init only", "ode.safetensors", "student"),
        ("DMD without ODE init", "dmd_no_ode/dmd.safetensors", "student"),
        ("DMD with the causal teacher", "dmd_causal_teacher/dmd.safetensors", "student"),
        ("**CausVid** (ODE init + DMD, bidirectional teacher)", "dmd.safetensors", "student"),
    ]


def load(run, ckpt, kind, device, prompts):
    """-> (model, text (N, L, D_text), uncond (1, L, D_text)) for a row."""
    path = os.path.join(run, ckpt)
    model = utils.load_model(path, causal=kind != "teacher", device=device).eval()
    emb = toy.read_text_encoder(path).embed(prompts + [model.cfg.negative_prompt])
    return (
        model,
        utils.stack_text(emb, prompts, "cpu"),
        emb[model.cfg.negative_prompt][None].to(device),
    )


def sample(
    model, kind, text, uncond, cfg, frames, seed, device, window=None, context=None, use_cache=True
):
    """-> (uint8 frames (N, F, H, W, 3), seconds to the first chunk, seconds in all)."""
    generate = utils.streaming(window) if use_cache else cv.recompute_generate
    make = utils.sampler(model, kind, cfg, device, uncond, generate)
    world = utils.make_world(cfg, device)
    return utils.generate(make, text, frames, world, seed, context=context)


def forward_passes(kind, cfg, frames):
    """Network evaluations per video, and frames per evaluation."""
    chunks, Q = frames // cfg.chunk_size, len(cfg.student_step_indices)
    if kind == "teacher":
        return f"{2 * cfg.teacher_steps} x {frames} frames"
    if kind == "causal":
        return (
            f"{2 * cfg.teacher_steps * chunks} + {2 * (chunks - 1)} cache x {cfg.chunk_size} frames"
        )
    return f"{Q * chunks} + {chunks - 1} cache x {cfg.chunk_size} frames"


def pyplot(figure: str):
    """matplotlib.pyplot with a file backend, or None (and a note that `figure` is skipped)
    without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install -r requirements-bench.txt): no {figure}")
        return None
    return plt


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# ---------------------------------------------------------------------------------------------
# Table 4, Fig. 8, Table 3
# ---------------------------------------------------------------------------------------------


def table4(run, teacher, causal, cfg, device, seeds, seed, report, base):
    prompts = [p for p in base for _ in range(seeds)]
    rows, grid = [], {}
    header = [
        "model",
        "best-fit PSNR (dB)",
        "prompt accuracy",
        "diversity",
        "steady motion",
        "forward passes",
        "CPU s",
    ]
    for label, ckpt, kind in models(teacher, causal):
        model, text, uncond = load(run, ckpt, kind, device, prompts)
        frames, _, seconds = sample(model, kind, text, uncond, cfg, cfg.num_frames, seed, device)
        s = toy.score_toy(frames, prompts)
        rows.append(
            [
                label,
                f"{s['best_fit_psnr']:.2f}",
                f"{100 * s['prompt_accuracy']:.1f}%",
                f"{s['diversity']:.2f}",
                f"{100 * s['steady_motion']:.1f}%",
                forward_passes(kind, cfg, cfg.num_frames),
                f"{seconds:.0f}",
            ]
        )
        grid[kind if kind == "teacher" else ckpt] = frames
        print(table(header, rows[-1:]))
    report.append(
        f"### Table 4 in miniature: {len(base)} prompts x {seeds} samples, "
        f"{cfg.num_frames} frames\n"
    )
    report.append(table(header[:-1] + ["CPU s (all samples)"], rows))
    # a GIF grid: teacher vs CausVid, one sample each of 8 prompts (rows: teacher, student)
    pick = [prompts.index(p) for p in base[::6]]
    both = torch.cat([grid["teacher"][pick], grid["dmd.safetensors"][pick]])
    utils.write_video(os.path.join(run, "study", "teacher_vs_causvid.gif"), both)


def long_videos(model, kind, text, uncond, cfg, frames, seed, device):
    """Fig. 8's long videos: the students stream with the sliding window of the training length; the
    causal diffusion model generates each chunk after the last window - K frames, re-encoded."""
    if kind != "causal":
        return sample(model, kind, text, uncond, cfg, frames, seed, device, window=cfg.num_frames)[
            0
        ]
    K, context = cfg.chunk_size, cfg.num_frames - cfg.chunk_size
    video = sample(model, kind, text, uncond, cfg, K, seed, device)[0]
    for c in range(1, frames // K):
        past = toy.to_model_space(video[:, -context:])
        video = torch.cat(
            [
                video,
                sample(model, kind, text, uncond, cfg, K, seed + c, device, context=past)[0][
                    :, -K:
                ],
            ],
            1,
        )
    return video


def fig8(run, causal, cfg, device, frames, seed, report, prompts):
    rows, curves = [], {}
    for label, ckpt, kind in models(None, causal)[1:]:  # the causal models
        model, text, uncond = load(run, ckpt, kind, device, prompts)
        video = long_videos(model, kind, text, uncond, cfg, frames, seed, device)
        w = toy.window_psnr(video, prompts, cfg.num_frames).mean(0)
        curves[label] = w.tolist()
        rows.append([label] + [f"{v:.2f}" for v in w.tolist()] + [f"{(w[-1] - w[0]).item():+.2f}"])
        print(table(["model"] + [f"w{i}" for i in range(len(w))] + ["last - first"], rows[-1:]))
        if ckpt == "dmd.safetensors":
            utils.write_video(os.path.join(run, "study", "causvid_long.gif"), video[::6])
    n = frames // cfg.num_frames
    report.append(
        f"\n### Fig. 8 in miniature: {frames}-frame videos ({n}x the training length), "
        f"one per prompt, sliding window of {cfg.num_frames} frames; "
        f"best-fit PSNR (dB) per {cfg.num_frames}-frame window\n"
    )
    report.append(
        table(
            ["model"]
            + [f"frames {i * cfg.num_frames}-{(i + 1) * cfg.num_frames - 1}" for i in range(n)]
            + ["last - first"],
            rows,
        )
    )
    plt = pyplot("fig8.png")
    if plt is None:
        return
    plt.figure(figsize=(6, 3.5))
    for label, ys in curves.items():
        plt.plot(range(1, len(ys) + 1), ys, marker="o", label=label.replace("**", ""))
    plt.xlabel(f"window ({cfg.num_frames} frames each)")
    plt.ylabel("best-fit PSNR (dB)")
    plt.xticks(range(1, n + 1))
    plt.legend(fontsize=6)
    plt.tight_layout()
    plt.savefig(os.path.join(run, "study", "fig8.png"), dpi=120)


def predicted_cache_speedup(cfg, frames):
    K, Q = cfg.chunk_size, len(cfg.student_step_indices)
    cached = sum(
        Q * attention_flops(cfg, K, c * K + K) + (attention_flops(cfg, K, c * K + K) if c else 0)
        for c in range(frames // K)
    )  # (cache fills: the previous chunk, over the cache + itself)
    uncached = sum(Q * attention_flops(cfg, c * K + K, c * K + K) for c in range(frames // K))
    return uncached / cached


def table3(run, teacher_path, cfg, device, seed, report, repeats=3):
    prompt = ["a red square moving right"]
    rows = []
    teacher, text, uncond = load(run, teacher_path, "teacher", device, prompt)
    student = load(run, "dmd.safetensors", "student", device, prompt)[0]
    for frames in [cfg.num_frames, 4 * cfg.num_frames]:
        for label, model, kind, cache in [
            ("bidirectional teacher", teacher, "teacher", True),
            ("CausVid student, KV cache", student, "student", True),
            ("CausVid student, no cache (recompute)", student, "student", False),
        ]:
            runs = [
                sample(model, kind, text, uncond, cfg, frames, seed, device, use_cache=cache)[1:]
                for _ in range(repeats)
            ]
            first, total = np.median([r[0] for r in runs]), np.median([r[1] for r in runs])
            rows.append([label, frames, f"{first:.3f}", f"{frames / total:.1f}"])
            print(table(["model", "frames", "first chunk (s)", "frames/s"], rows[-1:]))
    by = {(r[0], r[1]): r for r in rows}
    lines = []
    for frames in [cfg.num_frames, 4 * cfg.num_frames]:
        fps_cached = float(by[("CausVid student, KV cache", frames)][3])
        measured = fps_cached / float(by[("CausVid student, no cache (recompute)", frames)][3])
        teacher_clip, first = (
            float(by[("bidirectional teacher", frames)][2]),
            float(by[("CausVid student, KV cache", frames)][2]),
        )
        lines.append(
            f"| {frames} | {measured:.2f}x | {predicted_cache_speedup(cfg, frames):.2f}x "
            f"| {teacher_clip / first:.0f}x |"
        )
    report.append(
        f"\n### Table 3 in miniature: latency and throughput on this CPU "
        f"({torch.get_num_threads()} threads), batch 1, median of {repeats}; "
        "the cache and the student use no window here\n"
    )
    report.append(table(["model", "frames", "time to first chunk (s)", "frames/s"], rows))
    report.append(
        "\n| frames | KV-cache speed-up, measured | predicted by FLOPs | teacher's clip time / "
        "student's first chunk |\n|---|---|---|---|\n" + "\n".join(lines)
    )


# ---------------------------------------------------------------------------------------------
# The applications, measured (Sec. 5.3, 5.4)
# ---------------------------------------------------------------------------------------------


def lit_stats(frames):
    """Per frame: centroid (x, y) of the lit pixels and the nearest toy colour's name.
    frames uint8 (N, F, H, W, 3) -> centroids (N, F, 2), colours [[name]]."""
    lit = frames.max(-1).values > 127  # (N, F, H, W)
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    count = lit.sum((-1, -2)).clamp_min(1)
    cent = torch.stack([(lit * xs).sum((-1, -2)) / count, (lit * ys).sum((-1, -2)) / count], -1)
    mean = (frames.float() * lit[..., None]).sum((2, 3)) / count[..., None]  # (N, F, 3)
    names, rgb = list(toy.COLORS), torch.tensor(list(toy.COLORS.values()), dtype=torch.float)
    colour = [[names[int(torch.cdist(m[None], rgb).argmin())] for m in clip] for clip in mean]
    return cent, colour


def applications(run, cfg, device, seed, report, prompts):
    student = utils.load_model(os.path.join(run, "dmd.safetensors"), device=device).eval()
    K, g = cfg.chunk_size, torch.Generator().manual_seed(seed)
    emb = toy.read_text_encoder(os.path.join(run, "dmd.safetensors")).embed(toy.PROMPTS)
    ts = cv.student_timesteps(cfg).to(device)
    starts = torch.randint(0, toy.MAX_POS + 1, (len(prompts), 2), generator=g)
    truth = torch.stack(
        [toy.render(p, int(x), int(y), cfg.num_frames) for p, (x, y) in zip(prompts, starts)]
    )
    text = utils.stack_text(emb, prompts, device)
    noise = torch.randn(
        len(prompts), cfg.num_frames, cfg.channels, cfg.height, cfg.width, generator=g
    ).to(device)

    def stream(x, txt, tt=ts, context=None, window=None):
        chunks = utils.streaming(window)(student, x, txt, tt, g, context)
        return toy.to_uint8(torch.cat(list(chunks), 1))

    # image-to-video: frame 0 repeated to a chunk is the cached context;
    # K + ... generated frames follow
    context = toy.to_model_space(truth[:, :1]).expand(-1, K, -1, -1, -1).to(device)
    gen = stream(noise[:, : cfg.num_frames - K], text, context=context)
    i2v = toy.score_toy(
        torch.cat([truth[:, :1], gen], 1), prompts
    )  # given frame + 9 generated frames
    gifs = os.path.join(run, "study")
    utils.write_video(
        os.path.join(gifs, "i2v.gif"),
        torch.cat([truth[:8, :1].expand(-1, K, -1, -1, -1), gen[:8]], 1),
    )
    t2v = toy.score_toy(stream(noise, text)[:, : 1 + cfg.num_frames - K], prompts)
    start_idx = starts[:, 1] * 11 + starts[:, 0]
    fit = toy.psnr_to_all(torch.cat([truth[:, :1], gen], 1))[
        torch.arange(len(prompts)), [toy.PROMPTS.index(p) for p in prompts]
    ]
    same_start = (fit.argmax(1) == start_idx).float().mean().item()
    report.append(
        "\n### Image-to-video (frame 0 of a rendered clip, repeated to the first chunk, cached)\n"
    )
    report.append(
        table(
            [
                "video scored",
                "best-fit PSNR (dB)",
                "prompt accuracy",
                "best fit starts at the image's position",
            ],
            [
                [
                    f"given frame + {cfg.num_frames - K} generated",
                    f"{i2v['best_fit_psnr']:.2f}",
                    f"{100 * i2v['prompt_accuracy']:.1f}%",
                    f"{100 * same_start:.1f}%",
                ],
                [
                    f"text-to-video, first {1 + cfg.num_frames - K} frames",
                    f"{t2v['best_fit_psnr']:.2f}",
                    f"{100 * t2v['prompt_accuracy']:.1f}%",
                    "-",
                ],
            ],
        )
    )

    # video-to-video: rendered clips, a prompt of another colour; does the output follow the input?
    other = {c: list(toy.COLORS)[(i + 3) % 6] for i, c in enumerate(toy.COLORS)}
    targets = [p.replace(toy.parse_prompt(p)[0], other[toy.parse_prompt(p)[0]], 1) for p in prompts]
    ttext = utils.stack_text(emb, targets, device)
    cent_in, _ = lit_stats(truth)
    rows = []
    for strength in [0.5, 0.75, 0.9]:
        start = utils.student_start(cfg, strength)
        tt = ts[start:]
        x = cv.add_noise(
            toy.to_model_space(truth).to(device),
            noise,
            torch.full(noise.shape[:2], float(tt[0]), device=device),
        )
        out_frames = stream(x, ttext, tt)
        if strength == 0.75:  # top row: the inputs; bottom row: the outputs
            utils.write_video(os.path.join(gifs, "v2v.gif"), torch.cat([truth[:8], out_frames[:8]]))
        cent, colour = lit_stats(out_frames)
        follows = (cent - cent_in).abs().max(-1).values <= 1.0
        recoloured = torch.tensor(
            [[c == toy.parse_prompt(p)[0] for c in row] for p, row in zip(targets, colour)]
        )
        rows.append(
            [
                strength,
                f"{tt[0]:.0f}",
                f"{100 * follows.float().mean():.1f}%",
                f"{100 * recoloured.float().mean():.1f}%",
                f"{100 * (follows & recoloured).float().mean():.1f}%",
            ]
        )
    report.append(
        "\n### Video-to-video (rendered input, prompt of another colour; "
        "per frame: centroid within 1 px of the input's, colour = the prompt's)\n"
    )
    report.append(
        table(
            ["strength", "starts at t", "follows the input", "takes the prompt's colour", "both"],
            rows,
        )
    )

    # dynamic prompting: a colour switch at chunk 2 of a 24-frame video (window 12)
    frames = 2 * cfg.num_frames
    long_noise = torch.randn(
        len(prompts), frames, cfg.channels, cfg.height, cfg.width, generator=g
    ).to(device)
    per_chunk = [text if c < 2 else ttext for c in range(frames // K)]
    video = stream(long_noise, per_chunk, window=cfg.num_frames)
    utils.write_video(os.path.join(gifs, "switch.gif"), video[:8])
    cent, colour = lit_stats(video)
    chunk_rows = []
    for c in range(frames // K):
        want = [toy.parse_prompt(p if c < 2 else q)[0] for p, q in zip(prompts, targets)]
        share = np.mean(
            [[col == w for col in row[c * K : (c + 1) * K]] for row, w in zip(colour, want)]
        )
        chunk_rows.append(f"{100 * share:.0f}%")
    steps = (cent[:, 1:] - cent[:, :-1]).abs().max(-1).values  # (N, F-1)
    at_switch = steps[:, 2 * K - 1].mean().item()
    report.append(
        "\n### Dynamic prompting (colour switch at chunk 2 of 8; "
        "share of frames with the colour the prompt asks for at that chunk)\n"
    )
    report.append(table([f"chunk {c}" for c in range(frames // K)], [chunk_rows]))
    report.append(
        f"\nObject position across the switch: mean centroid step {at_switch:.2f} px "
        f"between frames {2 * K - 1} and {2 * K}, "
        f"vs {steps.mean().item():.2f} px per frame over the whole video."
    )

    # unbounded length: 120 frames, window 12
    frames = 10 * cfg.num_frames
    video = stream(
        torch.randn(len(prompts), frames, cfg.channels, cfg.height, cfg.width, generator=g).to(
            device
        ),
        text,
        window=cfg.num_frames,
    )
    w = toy.window_psnr(video, prompts, cfg.num_frames).mean(0)
    report.append(
        f"\n### Long video: {frames} frames, window {cfg.num_frames}; "
        "best-fit PSNR per window (dB)\n"
    )
    report.append(table([f"w{i}" for i in range(len(w))], [[f"{v:.2f}" for v in w.tolist()]]))


# ---------------------------------------------------------------------------------------------
# CausVid's successors, measured against it (docs/successors.md)
# ---------------------------------------------------------------------------------------------

SUCCESSORS = [
    ("**CausVid** (the defaults)", ".", []),
    ("+ Self-Forcing rollout", "self_forcing", ["--set", "self_forcing=true"]),
    ("+ causal ODE init (Causal Forcing)", "causal_init", ["--set", "causal_ode_init=true"]),
    (
        "+ both",
        "causal_init_self_forcing",
        ["--set", "causal_ode_init=true", "--set", "self_forcing=true"],
    ),
]


@torch.no_grad()
def one_step(args, run, teacher, causal, cfg, device, report):
    """Where the students' error is made: each student step run once, fed the teacher's own ODE
    state at its t (the chunks before it clean, as at inference) or the end point re-noised with
    fresh noise (as Alg. 2 feeds it), scored against the trajectory's end point -- per step and
    chunk, on the run's ODE pairs and on new ones (new noise and prompt draw) of the same teacher:
    the causal one where the run's pairs are causal_ode_init's."""
    own_pairs = training.ODEPairs(os.path.join(run, "ode_pairs"))
    n, is_causal = min(128, len(own_pairs)), own_pairs.teachers == {"causal"}
    if n == 0:
        raise cv.CausVidError(
            f"{run!r} has no ode_pairs/; run `python train_dmd.py --tiny --run-dir {run}` first"
        )
    maker = (
        causal if is_causal else teacher
    )  # who made the run's pairs: makes the new ones, gives the first weights
    held = os.path.join(run, "study", "heldout_causal_pairs" if is_causal else "heldout_pairs")
    ns = argparse.Namespace(prompts=None, exact_teacher=False, seed=args.seed + 1000)
    held_cfg, held_pairs = (
        dataclasses.replace(cfg, ode_pairs=n, causal_ode_init=is_causal),
        training.ODEPairs(held),
    )
    if held_pairs.teachers - {train_ode.teacher_kind(ns, held_cfg)}:
        raise cv.CausVidError(f"{held!r} holds another teacher's pairs; delete it")
    text_encoder = toy.read_text_encoder(maker).to(device)
    if len(held_pairs) < n:
        held_world = utils.make_world(held_cfg, device)
        train_ode.make_ode_pairs(
            ns, held_world, utils.load_model(maker, device=device), text_encoder, held
        )
    first = "the causal teacher's weights" if is_causal else "teacher's weights, causal"
    students = [
        (f"{first} (before stage 1)", maker),
        ("4-step student, ODE init only", os.path.join(run, "ode.safetensors")),
    ]
    students += [
        (label, path)
        for label, path in [
            ("CausVid student (ODE init + DMD)", os.path.join(run, "dmd.safetensors")),
            (
                "Self-Forcing's DMD on this ODE init",
                os.path.join(run, "self_forcing", "dmd.safetensors"),
            ),
        ]
        if os.path.exists(path)
    ]  # (the DMD students the run has)
    students = [
        (label, utils.load_model(path, causal=True, device=device).eval())
        for label, path in students
    ]
    ts, K, C, rows = (
        cv.student_timesteps(cfg).to(device),
        cfg.chunk_size,
        cfg.num_frames // cfg.chunk_size,
        [],
    )
    psnr = lambda mse: f"{10 * torch.log10(4 / mse).item():.2f}"  # noqa: E731 -- pixels in [-1, 1]
    for where, pairs in [
        ("training", own_pairs),
        ("held-out", training.ODEPairs(held)),
    ]:  # (held: as made above)
        traj, prompts = pairs.get(range(n)).to(device), pairs.prompts[:n]
        text = utils.stack_text(text_encoder.embed(prompts), prompts, device)
        x0, fresh = (
            traj[:, -1],
            torch.randn(traj[:, -1].shape, generator=torch.Generator().manual_seed(args.seed)).to(
                device
            ),
        )
        for label, model in students:
            for q, t in enumerate(ts.tolist()):
                mse = torch.zeros(2, C)
                for i, x in enumerate(
                    [traj[:, q], cv.add_noise(x0, fresh, torch.tensor(t, device=device))]
                ):
                    for c in range(C):
                        x_in, t_in = x.clone(), torch.full(x.shape[:2], t, device=device)
                        x_in[:, : c * K], t_in[:, : c * K] = x0[:, : c * K], 0.0
                        x0_hat = torch.cat(
                            [
                                cv.predict_x0(
                                    model, x_in[j : j + 32], t_in[j : j + 32], text[j : j + 32]
                                )
                                for j in range(0, n, 32)
                            ]
                        )
                        chunk = slice(c * K, (c + 1) * K)
                        mse[i, c] = (x0_hat[:, chunk] - x0[:, chunk]).float().pow(2).mean()
                rows.append(
                    [label, f"{where} ({n})", f"{t:.0f}"]
                    + [psnr(m) for m in mse[0]]
                    + [psnr(mse[0].mean()), psnr(mse[1].mean())]
                )
            print(table(["model"], [rows[-1][:1]]))
    report.append(
        "\n### One student step, fed the teacher's trajectory: "
        "PSNR (dB) of its x0 prediction against the trajectory's end point (earlier chunks clean)\n"
    )
    report.append(
        table(
            ["model", "ODE pairs", "t"]
            + [f"chunk {c + 1}" for c in range(C)]
            + ["mean", "mean, end point re-noised"],
            rows,
        )
    )


def train_successors(args, run, world):
    """Each variant's student from the run's teacher. Self-Forcing starts DMD from the ODE student
    it shares with its base; its DMD gets the wall-clock of the run's own DMD (iterations scaled by
    the seconds per iteration of a 10-iteration calibration). The causal init trains
    its own stage 1."""
    base = utils.load_checkpoint(os.path.join(run, "dmd.safetensors"), keep=lambda k: False)[2]
    common = ["--tiny", "--seed", str(args.seed), "--teacher", utils.teacher_path(args, run, world)]
    common += ["--no-scorecard"]  # (the study scores every model itself)
    common += (["--device", args.device] if args.device else []) + [
        a for item in args.set for a in ("--set", item)
    ]
    common += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    for _, sub, flags in SUCCESSORS[1:]:
        out = os.path.join(run, sub)
        if os.path.exists(os.path.join(out, "dmd.safetensors")):
            continue
        steps = base["steps"]
        if "self_forcing=true" in flags:
            init = os.path.join(
                run, "causal_init" if "causal_ode_init=true" in flags else "", "ode.safetensors"
            )
            calibration = os.path.join(out, "calibration")
            train_dmd.main(
                common
                + flags
                + [
                    "--run-dir",
                    calibration,
                    "--ode",
                    init,
                    "--steps",
                    "10",
                    "--sample-every",
                    "100",
                ]
            )
            spi = utils.load_checkpoint(
                os.path.join(calibration, "dmd.safetensors"), keep=lambda k: False
            )[2]
            steps = max(
                1, round(steps * base["seconds_per_iteration"] / spi["seconds_per_iteration"])
            )
            flags = flags + ["--ode", init]
        elif os.path.exists(
            os.path.join(run, "causal_diffusion.safetensors")
        ):  # the baseline of Table 4 is its teacher
            os.makedirs(out, exist_ok=True)
            shutil.copy(os.path.join(run, "causal_diffusion.safetensors"), out)
        train_dmd.main(common + flags + ["--run-dir", out, "--steps", str(steps)])


def successors(args, run, cfg, device, report, base):
    if "train" in (args.only or PARTS):
        train_successors(args, run, utils.make_world(cfg, device))
    prompts = [p for p in base for _ in range(args.seeds)]
    header = [
        "model",
        "best-fit PSNR (dB)",
        "prompt accuracy",
        "steady 1-px motion",
        "first-chunk pauses",
        "diversity",
        "DMD iterations",
        "DMD s/iteration",
    ]
    rows = []
    for label, sub, _ in SUCCESSORS:
        model, text, uncond = load(
            os.path.join(run, sub), "dmd.safetensors", "student", device, prompts
        )
        meta = utils.load_checkpoint(
            os.path.join(run, sub, "dmd.safetensors"), keep=lambda k: False
        )[2]
        s = toy.score_toy(
            sample(model, "student", text, uncond, cfg, cfg.num_frames, args.seed, device)[0],
            prompts,
        )
        rows.append(
            [
                label,
                f"{s['best_fit_psnr']:.2f}",
                f"{100 * s['prompt_accuracy']:.1f}%",
                f"{100 * s['steady_motion']:.1f}%",
                f"{100 * s['first_chunk_pause']:.1f}%",
                f"{s['diversity']:.2f}",
                meta["steps"],
                f"{meta['seconds_per_iteration']:.2f}",
            ]
        )
        print(table(header, rows[-1:]))
    report.append(
        f"\n### CausVid and its successors: {len(base)} prompts x {args.seeds} samples, "
        f"{cfg.num_frames} frames\n"
    )
    report.append(table(header, rows))


@torch.no_grad()
def long_video(run, cfg, device, seed, frames, report, prompts):
    """The official re-encoding window against a rolling cache with and without a sink, on a
    student: best-fit PSNR per window and the CPU time of every chunk (a re-encode is a spike)."""
    student, text, _ = load(run, "dmd.safetensors", "student", device, prompts)
    K, ts, rows = cfg.chunk_size, cv.student_timesteps(cfg).to(device), []
    W = cfg.num_frames - K  # a window one chunk shorter than training: room for a capped gap
    for label, kw in [
        ("re-encoding window (official)", dict(window=cfg.num_frames)),
        ("rolling cache, no sink (sink 0)", dict(window=cfg.num_frames, sink=0)),
        (f"rolling cache, sink {K}, contiguous positions", dict(window=cfg.num_frames, sink=K)),
        (
            f"rolling cache, sink {K}, absolute positions",
            dict(window=cfg.num_frames, sink=K, sink_gap=-1),
        ),
        (f"rolling cache, window {W}, sink {K}, contiguous", dict(window=W, sink=K)),
        (
            f"rolling cache, window {W}, sink {K}, gap <= {K} (positions <= training's)",
            dict(window=W, sink=K, sink_gap=K),
        ),
    ]:

        def rng(c):
            return utils.chunk_rng(seed, c, 1, device)

        noise = torch.cat(
            [
                torch.randn(
                    len(prompts),
                    K,
                    cfg.channels,
                    cfg.height,
                    cfg.width,
                    generator=utils.chunk_rng(seed, c, 0, device),
                )
                for c in range(frames // K)
            ],
            1,
        )
        chunks, times, t0 = [], [], time.perf_counter()
        for chunk in utils.streaming(**kw)(student, noise, text.to(device), ts, rng):
            chunks.append(chunk)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
        video = toy.to_uint8(torch.cat(chunks, 1))
        w = toy.window_psnr(video, prompts, cfg.num_frames).mean(0)
        steady = toy.steady_motion(video, prompts).mean()
        per_chunk = torch.tensor(times[1:])  # the first chunk compiles nothing but warms caches
        rows.append(
            [
                label,
                f"{w[0]:.2f}",
                f"{w.mean():.2f}",
                f"{w[-1]:.2f}",
                f"{(w - w[0]).abs().max():.2f}",
                f"{100 * steady:.1f}%",
                f"{1000 * sum(times) / frames / len(prompts):.2f}",
                f"{(per_chunk.max() / per_chunk.median()):.2f}",
            ]
        )
        print(table(["cache"], [rows[-1][:1]]))
    report.append(
        f"\n### Long video: {frames} frames, {len(prompts)} prompts, window {cfg.num_frames}\n"
    )
    report.append(
        table(
            [
                "cache",
                "first window (dB)",
                "mean over windows",
                "last window",
                "largest gap to the first",
                "steady 1-px motion",
                "CPU ms per frame and video",
                "slowest chunk / median chunk",
            ],
            rows,
        )
    )


# ---------------------------------------------------------------------------------------------
# What DMD saw (train_dmd.py's dmd_log.jsonl)
# ---------------------------------------------------------------------------------------------


def dmd_logs(run, report, asked: bool):
    """A table (about ten rows) and a chart, study/dmd_log_<name>.png, of every DMD run under
    `run` (its own dmd_log.jsonl and its subdirectories'): the critic's and the teacher's
    flow-matching loss on the generator's samples, DMD's gradient per chunk and per student step,
    the distance moved."""
    paths = sorted(
        glob.glob(os.path.join(run, "dmd_log.jsonl"))
        + glob.glob(os.path.join(run, "*", "dmd_log.jsonl"))
    )
    if not paths and asked:
        raise cv.CausVidError(
            f"no dmd_log.jsonl in {run!r} or its subdirectories; run train_dmd.py first"
        )
    for path in paths:
        rows = [
            r for r in map(json.loads, open(path)) if "critic_fm" in r
        ]  # the lines with a generator update
        if not rows:
            continue
        name = os.path.relpath(os.path.dirname(path), run).replace(os.sep, "_").replace(".", "run")
        keys = [
            k
            for k in dict.fromkeys(
                k for r in rows for k in r
            )  # (a step no chunk was made from is absent)
            if k in ("critic_fm", "teacher_fm", "distance") or k.startswith("grad_")
        ]
        report.append(
            f"\n### What DMD saw: {os.path.relpath(path)} "
            "(flow-matching losses on the generator's samples, "
            "RMS of DMD's gradient, distance from the stage-1 weights)\n"
        )
        every = max(1, len(rows) // 10)
        report.append(
            table(
                ["iteration"] + keys,
                [
                    [r["iteration"]] + [f"{r[k]:.4g}" if k in r else "" for k in keys]
                    for r in rows[every - 1 :: every]
                ],
            )
        )
        plt = pyplot(f"dmd_log_{name}.png")
        if plt is None:
            continue
        fig, axes = plt.subplots(1, 4, figsize=(14, 3))
        panels = [
            ("flow-matching loss", ("critic_fm", "teacher_fm")),
            ("gradient RMS per chunk", "grad_chunk"),
            ("gradient RMS per student step", "grad_step"),
            ("distance from stage 1", ("distance",)),
        ]
        for ax, (title, which) in zip(axes, panels):
            for k in [
                k for k in keys if (k in which if isinstance(which, tuple) else k.startswith(which))
            ]:
                ax.plot(
                    [r["iteration"] for r in rows if k in r],
                    [r[k] for r in rows if k in r],
                    label=k,
                )
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("iteration")
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(run, "study", f"dmd_log_{name}.png"), dpi=110)
        plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    cfg, device, run = utils.resolve(args)
    if cfg.name != "tiny":
        raise cv.CausVidError("the study runs on the toy world: use --tiny")
    torch.manual_seed(args.seed)
    parts = args.only or PARTS
    utils.writable_dir(os.path.join(run, "study"), "--run-dir")
    world = utils.make_world(cfg, device)
    teacher, causal = (
        utils.teacher_path(args, run, world),
        utils.causal_teacher_path(args, run, world),
    )
    if "train" in parts and (
        {"table4", "fig8"} & set(parts) or parts == ["train"]
    ):  # the baselines they compare
        train_missing(args, world, run, teacher)
    report = [f"## Toy-world study (`python study.py --tiny --run-dir {run}`)\n"]
    prompts = toy.PROMPTS[: args.num_prompts]
    if "table4" in parts:
        table4(run, teacher, causal, cfg, device, args.seeds, args.seed, report, prompts)
    if "fig8" in parts:
        fig8(run, causal, cfg, device, args.long_frames, args.seed, report, prompts)
    if "table3" in parts:
        table3(run, teacher, cfg, device, args.seed, report)
    if "apps" in parts:
        applications(run, cfg, device, args.seed, report, prompts)
    if "onestep" in parts:
        one_step(args, run, teacher, causal, cfg, device, report)
    if "successors" in parts:
        successors(args, run, cfg, device, report, prompts)
    if "long" in parts:
        long_video(run, cfg, device, args.seed, args.long_video, report, prompts)
    if "dmdlog" in parts:
        dmd_logs(run, report, asked=args.only is not None)
    text = "\n".join(report) + "\n"
    name = "results.md" if args.only is None else f"results_{'_'.join(parts)}.md"
    with open(os.path.join(run, "study", name), "w") as f:
        f.write(text)
    print("\n" + text + f"\nwrote {os.path.join(run, 'study', name)}")
    return text


if __name__ == "__main__":
    utils.run_cli(main)
