"""The evidence study: the paper's Table 4, Fig. 8 and Table 3 in miniature on the toy world, plus the
applications of Sec. 5.3-5.4 (image-to-video, video-to-video, dynamic prompting), measured.

    python evaluate.py --tiny --out runs/tiny      # after train_dmd.py --tiny

Trains the baselines that are missing from <out> (each is saved and reused):
  causal_diffusion.safetensors  the teacher fine-tuned with the block-causal mask and an independent
                                noise level per chunk (diffusion forcing, Sec. 4.2): a many-step
                                causal diffusion model, sampled chunk by chunk with CFG
  dmd_no_ode/dmd.safetensors    DMD with the generator initialised from the teacher, not from stage 1
  dmd_causal_teacher/dmd.safetensors   DMD with the causal diffusion model as the real score
then prints markdown tables and writes <out>/study/{results.md, fig8.png, *.gif}.
"""

import argparse
import os
import time

import numpy as np
import torch

import causvid as cv
import train_dmd
import train_ode


def parse_args(argv=None):
    p = cv.add_training_args(cv.add_common_args(argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)))
    p.add_argument("--seeds", type=int, default=4, help="samples per prompt for Table 4 (default: 4)")
    p.add_argument("--long-frames", type=int, default=48, help="frames of the Fig. 8 videos (default: 48)")
    p.add_argument("--causal-steps", type=int, default=600, help="diffusion-forcing fine-tuning steps (default: 600)")
    p.add_argument("--dmd-steps", type=int, help="DMD iterations of the two ablation runs (default: the preset's)")
    p.add_argument("--only", choices=["train", "table4", "fig8", "table3", "apps"], action="append",
                   help="run only these parts (repeatable; default: all)")
    p.add_argument("--num-prompts", type=int, default=48, help="use the first N toy prompts (default: all 48)")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines (default: 100)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The many-step causal diffusion baseline (diffusion forcing)
# ---------------------------------------------------------------------------------------------


def train_causal_diffusion(teacher_path, path, cfg, steps, device, seed, log_every, resume, save_every):
    """Flow matching (Eq. 2) with the block-causal mask and one random t per chunk, from the teacher."""
    model = cv.load_model(teacher_path, causal=True, device=device, expect=cfg).train()
    text_encoder = cv.load_text_encoder(teacher_path).to(device)
    emb = cv.embed_prompts(text_encoder, cv.PROMPTS + [""])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr_ode, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 3)
    t0, B, K = time.time(), cfg.batch_size, cfg.chunk_size
    with cv.TrainLoop(path.replace(".safetensors", "_state.safetensors"), cfg, steps,
                      {"model": model, "opt": opt, "data": g}, resume, save_every, "diffusion forcing") as loop:
        for step in loop:
            x0, prompts = cv.toy_batch(B, cfg.num_frames, g)
            drop = torch.rand(B, generator=g) < cfg.cfg_dropout
            text = torch.stack([emb["" if d else p] for p, d in zip(prompts, drop)]).to(device)
            t = cv.shift_timesteps(torch.sigmoid(torch.randn(B, cfg.num_frames // K, generator=g)) * 1000, cfg.shift)
            with cv.autocast(device):
                loss = cv.flow_matching_loss(model, x0.to(device), t.repeat_interleave(K, 1).to(device), text)
            norm = cv.optimizer_step(loss, opt, model.parameters(), cfg.grad_clip)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                train_ode.log("causal diffusion", step + 1, steps, t0, loss=loss.item(), grad_norm=norm)
        cv.save_model(path, model.eval(), text_encoder, stage="causal_diffusion", steps=steps)
    print(f"wrote {path}")


def train_missing(args, cfg, device, out):
    teacher, ode = os.path.join(out, "teacher.safetensors"), os.path.join(out, "ode.safetensors")
    if not os.path.exists(teacher):
        raise cv.CausVidError(f"{teacher!r} not found; run `python train_dmd.py --tiny --out {out}` first")
    causal = os.path.join(out, "causal_diffusion.safetensors")
    if not os.path.exists(causal):
        train_causal_diffusion(teacher, causal, cfg, args.causal_steps, device, args.seed, args.log_every,
                               args.resume, args.save_every)
    common = ["--tiny", "--seed", str(args.seed), "--save-every", str(args.save_every)] + ["--resume"] * args.resume
    common += ["--steps", str(args.dmd_steps)] if args.dmd_steps else []
    common += ["--device", args.device] if args.device else []
    for name, init, real in [("dmd_no_ode", teacher, teacher), ("dmd_causal_teacher", ode, causal)]:
        if not os.path.exists(init):
            raise cv.CausVidError(f"{init!r} not found; run `python train_dmd.py --tiny --out {out}` first")
        if not os.path.exists(os.path.join(out, name, "dmd.safetensors")):
            train_dmd.main(common + ["--out", os.path.join(out, name), "--ode", init, "--teacher", real])


# ---------------------------------------------------------------------------------------------
# Sampling every model the same way
# ---------------------------------------------------------------------------------------------


def models(out):
    """(label, checkpoint, how it samples) for every row of Table 4."""
    return [("bidirectional teacher (Euler + CFG)", "teacher.safetensors", "teacher"),
            ("causal diffusion model (diffusion forcing, Euler + CFG)", "causal_diffusion.safetensors", "causal"),
            ("4-step student, ODE init only", "ode.safetensors", "student"),
            ("DMD without ODE init", "dmd_no_ode/dmd.safetensors", "student"),
            ("DMD with the causal teacher", "dmd_causal_teacher/dmd.safetensors", "student"),
            ("**CausVid** (ODE init + DMD, bidirectional teacher)", "dmd.safetensors", "student")]


@torch.no_grad()
def sample(model, kind, text, uncond, cfg, frames, seed, device, window=None, use_cache=True, batch=64):
    """-> (uint8 frames (N, F, H, W, 3), seconds to the first chunk of the first batch, seconds in all)."""
    videos, first, t0 = [], None, time.perf_counter()
    for i in range(0, len(text), batch):
        g = torch.Generator().manual_seed(seed + i)
        noise = torch.randn(len(text[i:i + batch]), frames, cfg.channels, cfg.height, cfg.width, generator=g).to(device)
        tb = text[i:i + batch].to(device)
        if kind == "teacher":
            video = cv.sample_ode(model, noise, tb, uncond, cfg.teacher_guidance, cfg.teacher_steps, cfg.shift)[0]
            first = first or time.perf_counter() - t0
        else:
            if kind == "causal":
                kw = dict(stochastic=False, uncond=uncond, guidance=cfg.teacher_guidance)
                ts = cv.sampling_schedule(cfg.teacher_steps, cfg.shift).float().to(device)
            else:
                kw, ts = {}, cv.student_timesteps(cfg).to(device)
            chunks = []
            for chunk in cv.stream_generate(model, noise, tb, ts, g, use_cache, window=window, **kw):
                chunks.append(chunk)
                first = first or time.perf_counter() - t0
            video = torch.cat(chunks, 1)
        videos.append(cv.to_uint8(video))
    return torch.cat(videos), first, time.perf_counter() - t0


def forward_passes(kind, cfg, frames):
    """Network evaluations per video, and frames per evaluation."""
    chunks, Q = frames // cfg.chunk_size, len(cfg.student_step_indices)
    if kind == "teacher":
        return f"{2 * cfg.teacher_steps} x {frames} frames"
    if kind == "causal":
        return f"{2 * cfg.teacher_steps * chunks} + {2 * (chunks - 1)} cache x {cfg.chunk_size} frames"
    return f"{Q * chunks} + {chunks - 1} cache x {cfg.chunk_size} frames"


def load(out, ckpt, kind, device):
    path = os.path.join(out, ckpt)
    model = cv.load_model(path, causal=kind != "teacher", device=device).eval()
    return model, cv.load_text_encoder(path).to(device)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# ---------------------------------------------------------------------------------------------
# Table 4, Fig. 8, Table 3
# ---------------------------------------------------------------------------------------------


def table4(out, cfg, device, seeds, seed, report, base):
    prompts = [p for p in base for _ in range(seeds)]
    rows, grid = [], {}
    for label, ckpt, kind in models(out):
        model, enc = load(out, ckpt, kind, device)
        emb = cv.embed_prompts(enc, prompts + [cfg.negative_prompt])
        text = torch.stack([emb[p] for p in prompts])
        frames, _, seconds = sample(model, kind, text, emb[cfg.negative_prompt][None].to(device), cfg,
                                    cfg.num_frames, seed, device)
        s = cv.score_toy(frames, prompts)
        rows.append([label, f"{s['best_fit_psnr']:.2f}", f"{100 * s['prompt_accuracy']:.1f}%", f"{s['diversity']:.2f}",
                     f"{100 * s['steady_motion']:.1f}%", forward_passes(kind, cfg, cfg.num_frames), f"{seconds:.0f}"])
        grid[ckpt] = frames
        print(table(["model", "best-fit PSNR (dB)", "prompt accuracy", "diversity", "steady motion", "forward passes", "CPU s"],
                    rows[-1:]))
    report.append(f"### Table 4 in miniature: {len(base)} prompts x {seeds} samples, {cfg.num_frames} frames\n")
    report.append(table(["model", "best-fit PSNR (dB)", "prompt accuracy", "diversity", "steady motion",
                         "forward passes", "CPU s (all samples)"], rows))
    # a GIF grid: teacher vs CausVid, one sample each of 8 prompts (rows: teacher, student)
    pick = [prompts.index(p) for p in base[::6]]
    both = torch.cat([grid["teacher.safetensors"][pick], grid["dmd.safetensors"][pick]])
    cv.write_video(os.path.join(out, "study", "teacher_vs_causvid.gif"), both)


def fig8(out, cfg, device, frames, seed, report, prompts):
    rows, curves = [], {}
    for label, ckpt, kind in models(out)[1:]:  # the causal models
        model, enc = load(out, ckpt, kind, device)
        emb = cv.embed_prompts(enc, prompts + [cfg.negative_prompt])
        text = torch.stack([emb[p] for p in prompts])
        video, _, _ = sample(model, kind, text, emb[cfg.negative_prompt][None].to(device), cfg, frames, seed, device,
                             window=cfg.num_frames)
        w = cv.window_psnr(video, prompts, cfg.num_frames).mean(0)
        curves[label] = w.tolist()
        rows.append([label] + [f"{v:.2f}" for v in w.tolist()] + [f"{(w[-1] - w[0]).item():+.2f}"])
        print(table(["model"] + [f"w{i}" for i in range(len(w))] + ["last - first"], rows[-1:]))
        if ckpt == "dmd.safetensors":
            cv.write_video(os.path.join(out, "study", "causvid_long.gif"), video[::6])
    n = frames // cfg.num_frames
    report.append(f"\n### Fig. 8 in miniature: {frames}-frame videos ({n}x the training length), one per prompt, "
                  f"sliding window of {cfg.num_frames} frames; best-fit PSNR (dB) per {cfg.num_frames}-frame window\n")
    report.append(table(["model"] + [f"frames {i * cfg.num_frames}-{(i + 1) * cfg.num_frames - 1}" for i in range(n)]
                        + ["last - first"], rows))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-bench.txt): no fig8.png")
        return
    plt.figure(figsize=(6, 3.5))
    for label, ys in curves.items():
        plt.plot(range(1, len(ys) + 1), ys, marker="o", label=label.replace("**", ""))
    plt.xlabel(f"window ({cfg.num_frames} frames each)")
    plt.ylabel("best-fit PSNR (dB)")
    plt.xticks(range(1, n + 1))
    plt.legend(fontsize=6)
    plt.tight_layout()
    plt.savefig(os.path.join(out, "study", "fig8.png"), dpi=120)


def attention_flops(cfg, q_frames, kv_frames):
    """Multiply-adds x 2 of one DiT forward on q_frames attending over kv_frames (linear layers,
    self- and cross-attention; embeddings and head are negligible)."""
    N = (cfg.height // cfg.patch_size[1]) * (cfg.width // cfg.patch_size[2])
    Sq, Skv, D, L = q_frames * N, kv_frames * N, cfg.dim, cfg.text_len
    per_layer = 2 * (4 * Sq * D * D + 2 * Sq * Skv * D  # self-attention: q, k, v, o and QK^T, AV
                     + 2 * Sq * D * D + 2 * L * D * D + 2 * Sq * L * D  # cross-attention
                     + 2 * Sq * D * cfg.ffn_dim)  # FFN
    return cfg.num_layers * per_layer


def predicted_cache_speedup(cfg, frames):
    K, Q = cfg.chunk_size, len(cfg.student_step_indices)
    cached = sum(Q * attention_flops(cfg, K, c * K + K) + (attention_flops(cfg, K, c * K + K) if c else 0)
                 for c in range(frames // K))  # (cache fills: the previous chunk, over the cache + itself)
    uncached = sum(Q * attention_flops(cfg, c * K + K, c * K + K) for c in range(frames // K))
    return uncached / cached


def table3(out, cfg, device, seed, report, repeats=3):
    prompt = ["a red square moving right"]
    rows = []
    teacher, enc = load(out, "teacher.safetensors", "teacher", device)
    student, _ = load(out, "dmd.safetensors", "student", device)
    emb = cv.embed_prompts(enc, prompt + [cfg.negative_prompt])
    text, uncond = emb[prompt[0]][None], emb[cfg.negative_prompt][None].to(device)
    for frames in [cfg.num_frames, 4 * cfg.num_frames]:
        for label, model, kind, cache in [("bidirectional teacher", teacher, "teacher", True),
                                          ("CausVid student, KV cache", student, "student", True),
                                          ("CausVid student, no cache (recompute)", student, "student", False)]:
            runs = [sample(model, kind, text, uncond, cfg, frames, seed, device, use_cache=cache)[1:]
                    for _ in range(repeats)]
            first, total = np.median([r[0] for r in runs]), np.median([r[1] for r in runs])
            rows.append([label, frames, f"{first:.3f}", f"{frames / total:.1f}"])
            print(table(["model", "frames", "first chunk (s)", "frames/s"], rows[-1:]))
    by = {(r[0], r[1]): r for r in rows}
    lines = []
    for frames in [cfg.num_frames, 4 * cfg.num_frames]:
        fps_cached = float(by[("CausVid student, KV cache", frames)][3])
        measured = fps_cached / float(by[("CausVid student, no cache (recompute)", frames)][3])
        lines.append(f"| {frames} | {measured:.2f}x | {predicted_cache_speedup(cfg, frames):.2f}x |")
        teacher_clip = float(by[("bidirectional teacher", frames)][2])
        first = float(by[("CausVid student, KV cache", frames)][2])
        lines[-1] += f" {teacher_clip / first:.0f}x |"
    report.append(f"\n### Table 3 in miniature: latency and throughput on this CPU ({torch.get_num_threads()} "
                  f"threads), batch 1, median of {repeats}; the cache and the student use no window here\n")
    report.append(table(["model", "frames", "time to first chunk (s)", "frames/s"], rows))
    report.append("\n| frames | KV-cache speed-up, measured | predicted by FLOPs | teacher's clip time / "
                  "student's first chunk |\n|---|---|---|---|\n" + "\n".join(lines))


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
    names, rgb = list(cv.COLORS), torch.tensor(list(cv.COLORS.values()), dtype=torch.float)
    colour = [[names[int(torch.cdist(m[None], rgb).argmin())] for m in clip] for clip in mean]
    return cent, colour


def applications(out, cfg, device, seed, report, prompts):
    from sample import student_start

    student, enc = load(out, "dmd.safetensors", "student", device)
    K, g = cfg.chunk_size, torch.Generator().manual_seed(seed)
    emb = cv.embed_prompts(enc, cv.PROMPTS)
    ts = cv.student_timesteps(cfg).to(device)
    starts = torch.randint(0, cv.MAX_POS + 1, (len(prompts), 2), generator=g)
    truth = torch.stack([cv.render(p, int(x), int(y), cfg.num_frames) for p, (x, y) in zip(prompts, starts)])
    text = torch.stack([emb[p] for p in prompts]).to(device)
    noise = torch.randn(len(prompts), cfg.num_frames, cfg.channels, cfg.height, cfg.width, generator=g).to(device)
    run = lambda x, txt, tt=ts, **kw: cv.to_uint8(torch.cat(list(cv.stream_generate(student, x, txt, tt, g, **kw)), 1))

    # image-to-video: frame 0 repeated to a chunk is the cached context; K + ... generated frames follow
    context = cv.to_model_space(truth[:, :1]).expand(-1, K, -1, -1, -1).to(device)
    gen = run(noise[:, :cfg.num_frames - K], text, context=context)
    i2v = cv.score_toy(torch.cat([truth[:, :1], gen], 1), prompts)  # given frame + 9 generated frames
    gifs = os.path.join(out, "study")
    cv.write_video(os.path.join(gifs, "i2v.gif"), torch.cat([truth[:8, :1].expand(-1, K, -1, -1, -1), gen[:8]], 1))
    t2v = cv.score_toy(run(noise, text)[:, :1 + cfg.num_frames - K], prompts)
    start_idx = starts[:, 1] * 11 + starts[:, 0]
    fit = cv.psnr_to_all(torch.cat([truth[:, :1], gen], 1))[torch.arange(len(prompts)), [cv.PROMPTS.index(p) for p in prompts]]
    same_start = (fit.argmax(1) == start_idx).float().mean().item()
    report.append("\n### Image-to-video (frame 0 of a rendered clip, repeated to the first chunk, cached)\n")
    report.append(table(["video scored", "best-fit PSNR (dB)", "prompt accuracy", "best fit starts at the image's position"],
                        [[f"given frame + {cfg.num_frames - K} generated", f"{i2v['best_fit_psnr']:.2f}",
                          f"{100 * i2v['prompt_accuracy']:.1f}%", f"{100 * same_start:.1f}%"],
                         [f"text-to-video, first {1 + cfg.num_frames - K} frames", f"{t2v['best_fit_psnr']:.2f}",
                          f"{100 * t2v['prompt_accuracy']:.1f}%", "-"]]))

    # video-to-video: rendered clips, a prompt of another colour; does the output follow the input?
    other = {c: list(cv.COLORS)[(i + 3) % 6] for i, c in enumerate(cv.COLORS)}
    targets = [p.replace(cv.parse_prompt(p)[0], other[cv.parse_prompt(p)[0]], 1) for p in prompts]
    ttext = torch.stack([emb[p] for p in targets]).to(device)
    cent_in, _ = lit_stats(truth)
    rows = []
    for strength in [0.5, 0.75, 0.9]:
        start = student_start(cfg, strength)
        tt = ts[start:]
        x = cv.add_noise(cv.to_model_space(truth).to(device), noise, torch.full(noise.shape[:2], float(tt[0]), device=device))
        out_frames = run(x, ttext, tt)
        if strength == 0.75:  # top row: the inputs; bottom row: the outputs
            cv.write_video(os.path.join(gifs, "v2v.gif"), torch.cat([truth[:8], out_frames[:8]]))
        cent, colour = lit_stats(out_frames)
        follows = (cent - cent_in).abs().max(-1).values <= 1.0
        recoloured = torch.tensor([[c == cv.parse_prompt(p)[0] for c in row] for p, row in zip(targets, colour)])
        rows.append([strength, f"{tt[0]:.0f}", f"{100 * follows.float().mean():.1f}%",
                     f"{100 * recoloured.float().mean():.1f}%", f"{100 * (follows & recoloured).float().mean():.1f}%"])
    report.append("\n### Video-to-video (rendered input, prompt of another colour; per frame: centroid within "
                  "1 px of the input's, colour = the prompt's)\n")
    report.append(table(["strength", "starts at t", "follows the input", "takes the prompt's colour", "both"], rows))

    # dynamic prompting: a colour switch at chunk 2 of a 24-frame video (window 12)
    frames = 2 * cfg.num_frames
    long_noise = torch.randn(len(prompts), frames, cfg.channels, cfg.height, cfg.width, generator=g).to(device)
    per_chunk = [text if c < 2 else ttext for c in range(frames // K)]
    video = run(long_noise, per_chunk, window=cfg.num_frames)
    cv.write_video(os.path.join(gifs, "switch.gif"), video[:8])
    cent, colour = lit_stats(video)
    chunk_rows = []
    for c in range(frames // K):
        want = [cv.parse_prompt(p if c < 2 else q)[0] for p, q in zip(prompts, targets)]
        share = np.mean([[col == w for col in row[c * K:(c + 1) * K]] for row, w in zip(colour, want)])
        chunk_rows.append(f"{100 * share:.0f}%")
    steps = (cent[:, 1:] - cent[:, :-1]).abs().max(-1).values  # (N, F-1)
    at_switch = steps[:, 2 * K - 1].mean().item()
    report.append("\n### Dynamic prompting (colour switch at chunk 2 of 8; share of frames with the colour the "
                  "prompt asks for at that chunk)\n")
    report.append(table([f"chunk {c}" for c in range(frames // K)], [chunk_rows]))
    report.append(f"\nObject position across the switch: mean centroid step {at_switch:.2f} px between frames "
                  f"{2 * K - 1} and {2 * K}, vs {steps.mean().item():.2f} px per frame over the whole video.")

    # unbounded length: 120 frames, window 12
    frames = 10 * cfg.num_frames
    video = run(torch.randn(len(prompts), frames, cfg.channels, cfg.height, cfg.width, generator=g).to(device), text,
                window=cfg.num_frames)
    w = cv.window_psnr(video, prompts, cfg.num_frames).mean(0)
    report.append(f"\n### Long video: {frames} frames, window {cfg.num_frames}; best-fit PSNR per window (dB)\n")
    report.append(table([f"w{i}" for i in range(len(w))], [[f"{v:.2f}" for v in w.tolist()]]))


def main(argv=None):
    args = parse_args(argv)
    cfg, device, out = cv.resolve_common(args)
    if cfg.name != "tiny":
        raise cv.CausVidError("the study runs on the toy world: use --tiny")
    torch.manual_seed(args.seed)
    parts = args.only or ["train", "table4", "fig8", "table3", "apps"]
    os.makedirs(os.path.join(out, "study"), exist_ok=True)
    if "train" in parts:
        train_missing(args, cfg, device, out)
    report = [f"## Toy-world study (`python evaluate.py --tiny --out {out}`)\n"]
    prompts = cv.PROMPTS[:args.num_prompts]
    if "table4" in parts:
        table4(out, cfg, device, args.seeds, args.seed, report, prompts)
    if "fig8" in parts:
        fig8(out, cfg, device, args.long_frames, args.seed, report, prompts)
    if "table3" in parts:
        table3(out, cfg, device, args.seed, report)
    if "apps" in parts:
        applications(out, cfg, device, args.seed, report, prompts)
    text = "\n".join(report) + "\n"
    name = "results.md" if args.only is None else f"results_{'_'.join(parts)}.md"
    with open(os.path.join(out, "study", name), "w") as f:
        f.write(text)
    print("\n" + text + f"\nwrote {os.path.join(out, 'study', name)}")
    return text


if __name__ == "__main__":
    cv.run_cli(main)
