"""Stage 1 of CausVid: ODE initialisation of the block-causal student (Sec. 4.3, Eq. 6; Alg. 1 line 1).

  0. the bidirectional teacher s_data: --teacher PATH, or <out>/teacher.safetensors, or -- toy world
     only -- pre-trained here with flow matching, standing in for a pretrained video model;
  1. ODE pairs: the teacher's Euler + CFG trajectories from noise, kept at the student's timesteps;
  2. regression of the block-causal student (initialised from the teacher) onto the trajectories'
     end points, every chunk at its own student timestep (Eq. 6) -- or at the clean end point, t = 0,
     as context for the chunks after it, the way inference sees it (clean_context).

Writes <out>/teacher.safetensors (if pre-trained here), <out>/ode_pairs.safetensors, <out>/ode.safetensors.
"""

import argparse
import os
import time

import torch
from tqdm.auto import tqdm

import causvid as cv


def parse_args(argv=None):
    p = cv.add_training_args(cv.add_common_args(argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)))
    p.add_argument("--steps", type=int, help="ODE regression steps (default: the preset's ode_steps)")
    p.add_argument("--teacher", help="a bidirectional teacher checkpoint (default: <out>/teacher.safetensors, "
                                     "pre-trained first on the toy world if it does not exist)")
    p.add_argument("--teacher-steps", type=int, help="toy teacher pre-training steps (default: the preset's)")
    p.add_argument("--pairs", type=int, help="number of ODE pairs (default: the preset's ode_pairs)")
    p.add_argument("--prompts", help="prompt file, one per line, for the ODE pairs (default: the 48 toy "
                                     "prompts; required for Wan)")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines (default: 100)")
    return p.parse_args(argv)


def log(stage, step, total, t0, **values):
    items = " | ".join(f"{k} {v:.4g}" for k, v in values.items())
    tqdm.write(f"{stage} step {step}/{total} | {items} | {time.time() - t0:.0f} s")


def pretrain_teacher(cfg: cv.Config, steps: int, device, seed: int, log_every: int, path: str,
                     resume: bool = False, save_every: int = 500):
    """Stand-in for a pretrained video model (toy world only): a bidirectional DiT trained with flow
    matching (Eq. 2) on Moving Shapes; shifted logit-normal timesteps, one per clip; 10% empty prompts for
    classifier-free guidance; warm-up + cosine learning rate; bf16 autocast where the device computes
    bf16 natively (cv.autocast); EMA weights are the result, saved to `path`."""
    text_encoder = cv.build_text_encoder(cfg)
    emb = cv.embed_prompts(text_encoder, cv.PROMPTS + [""])
    model = cv.DiT(cfg).to(device)
    ema = cv.EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr_teacher, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0, B = time.time(), cfg.batch_size
    state = {"model": model, "ema": ema, "opt": opt, "data": g}
    with cv.TrainLoop(path.replace(".safetensors", "_state.safetensors"), cfg, steps, state, resume, save_every,
                      "teacher pre-training") as loop:
        for step in loop:
            x0, prompts = cv.toy_batch(B, cfg.num_frames, g)
            drop = torch.rand(B, generator=g) < cfg.cfg_dropout
            text = torch.stack([emb["" if d else p] for p, d in zip(prompts, drop)]).to(device)
            t = cv.shift_timesteps(torch.sigmoid(torch.randn(B, 1, generator=g)) * 1000, cfg.shift)
            t = t.expand(B, cfg.num_frames).to(device)
            with cv.autocast(device, training=True):
                loss = cv.flow_matching_loss(model, x0.to(device), t, text)
            norm = cv.optimizer_step(loss, opt, model.parameters(), cfg.grad_clip,
                                     cv.lr_at(step, steps, cfg.lr_teacher, cfg.warmup))
            ema.update(model)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                log("teacher", step + 1, steps, t0, loss=loss.item(), grad_norm=norm)
        model.load_state_dict(ema.shadow)
        cv.save_model(path, model, text_encoder, stage="teacher", steps=steps)  # before the state is dropped
    print(f"wrote {path}")
    return model.eval(), text_encoder


@torch.no_grad()
def make_ode_pairs(teacher, text_encoder, cfg: cv.Config, n: int, device, seed: int, pool: list[str], batch: int = 64):
    """Sec. 4.3: teacher trajectories from noise (Euler, CFG with the negative prompt), recorded at
    the student's timesteps, for prompts drawn from `pool`. Returns (trajectories (n, Q+1, F, C, H, W), prompts)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [pool[i] for i in torch.randint(0, len(pool), (n,), generator=g)]
    batch = min(batch, cfg.batch_size) if cfg.name != "tiny" else batch
    emb = cv.embed_prompts(text_encoder, prompts + [cfg.negative_prompt])
    uncond = emb[cfg.negative_prompt][None].to(device)
    trajs = []
    for i in tqdm(range(0, n, batch), desc="ODE pairs"):
        p = prompts[i:i + batch]
        noise = torch.randn(len(p), cfg.num_frames, cfg.channels, cfg.height, cfg.width, generator=g).to(device)
        text = torch.stack([emb[q] for q in p]).to(device)
        with cv.autocast(device):
            _, traj = cv.sample_ode(teacher, noise, text, uncond, cfg.teacher_guidance, cfg.teacher_steps,
                                    cfg.shift, keep=cfg.student_step_indices)
        trajs.append(traj.float().cpu())
    return torch.cat(trajs), prompts


def regress_student(teacher, text_encoder, pairs, prompts, cfg: cv.Config, steps: int, device, seed: int,
                    log_every: int, path: str, resume: bool = False, save_every: int = 500):
    """Eq. 6 on the ODE pairs; the student starts from the teacher's weights with the causal mask.
    Saved to `path`."""
    student = cv.DiT(cfg, causal=True).to(device)
    student.load_state_dict(teacher.state_dict())
    student.gradient_checkpointing = cfg.gradient_checkpointing
    emb = cv.embed_prompts(text_encoder, prompts)
    timesteps = cv.student_timesteps(cfg)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr_ode, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.time()
    with cv.TrainLoop(path.replace(".safetensors", "_state.safetensors"), cfg, steps,
                      {"student": student, "opt": opt, "data": g}, resume, save_every, "ODE regression") as loop:
        for step in loop:
            idx = torch.randint(0, len(pairs), (cfg.batch_size,), generator=g)
            text = torch.stack([emb[prompts[i]] for i in idx]).to(device)
            with cv.autocast(device):
                loss = cv.ode_regression_loss(student, pairs[idx].to(device), text, timesteps, cfg.chunk_size,
                                              cfg.clean_context)
            norm = cv.optimizer_step(loss, opt, student.parameters(), cfg.grad_clip)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                log("ode", step + 1, steps, t0, loss=loss.item(), grad_norm=norm)
        cv.save_model(path, student.eval(), text_encoder, stage="ode", steps=steps)
    print(f"wrote {path}")
    return student


def main(argv=None):
    args = parse_args(argv)
    cfg, device, out = cv.resolve_common(args)
    torch.manual_seed(args.seed)
    resumable = dict(resume=args.resume, save_every=args.save_every)

    teacher_path = args.teacher or os.path.join(out, "teacher.safetensors")
    if not args.teacher and not os.path.exists(teacher_path) and args.model_dir:
        teacher_path = args.model_dir  # the official Wan2.1 weights are the teacher
    if os.path.exists(teacher_path):
        print(f"teacher: {teacher_path}")
        teacher = cv.load_model(teacher_path, causal=False, device=device, expect=cfg).eval()
        text_encoder = cv.text_encoder_for(teacher_path, cfg, cv.text_dtype(device)).to(device)
    elif args.teacher or cfg.name != "tiny":
        raise cv.CausVidError(f"teacher checkpoint {teacher_path!r} not found; pass --teacher PATH or --model-dir DIR")
    else:
        steps = args.teacher_steps or cfg.teacher_train_steps
        print(f"no teacher at {teacher_path}: pre-training the toy teacher for {steps} steps "
              "(stands in for a pretrained video model)")
        teacher, text_encoder = pretrain_teacher(cfg, steps, device, args.seed, args.log_every, teacher_path,
                                                 **resumable)
    teacher.requires_grad_(False)

    n = args.pairs or cfg.ode_pairs
    pairs_path = os.path.join(out, "ode_pairs.safetensors")
    stored = cv.load_checkpoint(pairs_path) if os.path.exists(pairs_path) else None
    if stored is not None:
        cv.check_preset(stored[1], cfg, pairs_path)
        if stored[1].exact_teacher != cfg.exact_teacher:
            raise cv.CausVidError(f"{pairs_path!r} was made with exact_teacher={stored[1].exact_teacher}, this run has "
                                  f"{cfg.exact_teacher}; pass another --out, or delete the file")
    if stored is not None and stored[0]["trajectories"].shape[0] >= n:
        pairs, prompts = stored[0]["trajectories"][:n], stored[2]["prompts"][:n]
        print(f"ODE pairs: {pairs_path} ({n})")
    else:
        pairs, prompts = make_ode_pairs(cv.teacher_role(teacher, text_encoder, cfg), text_encoder, cfg, n, device,
                                        args.seed, cv.read_prompts(args.prompts, cfg))
        cv.save_checkpoint(pairs_path, {"trajectories": pairs}, cfg, prompts=prompts,
                           timesteps=cv.student_timesteps(cfg).tolist())
        print(f"wrote {pairs_path}: {n} trajectories at t = {cv.student_timesteps(cfg).tolist()} and 0")

    steps = args.steps or cfg.ode_steps
    regress_student(teacher, text_encoder, pairs, prompts, cfg, steps, device, args.seed, args.log_every,
                    os.path.join(out, "ode.safetensors"), **resumable)


if __name__ == "__main__":
    cv.run_cli(main)
