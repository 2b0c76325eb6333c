"""Stage 1 of CausVid: ODE initialisation of the block-causal student (Sec. 4.3, Eq. 6; Alg. 1 line 1).

  0. the bidirectional teacher s_data: --teacher PATH, <run>/teacher.safetensors, or the official Wan
     directory (--model-dir); on the toy world, pre-trained here with flow matching if there is none
     (a stand-in for a pretrained video model);
  1. ODE pairs: the teacher's Euler + CFG trajectories from noise, kept at the student's timesteps;
  2. regression of the block-causal student (initialised from the teacher) onto the trajectories'
     end points, every chunk at its own step of Alg. 1's T = {0, t1..tQ} (Eq. 6): a chunk at t = 0
     is clean context for the chunks after it, as inference sees it.

Writes <run>/teacher.safetensors (if pre-trained here), <run>/ode_pairs.safetensors, <run>/ode.safetensors.
"""

import argparse
import os
import time

import torch
from tqdm.auto import tqdm

import causvid as cv
import toy_world as toy
import utils


def parse_args(argv=None):
    p = utils.add_training_args(utils.add_common_args(argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)))
    p.add_argument("--steps", "--ode-steps", dest="ode_steps", type=int,
                   help="ODE regression steps (default: the preset's ode_steps)")
    return p.parse_args(argv)


def get_teacher(args, cfg: cv.Config, device, run: str):
    """The bidirectional teacher s_data and its text encoder: loaded, or on the toy world pre-trained
    with flow matching if there is none."""
    path = utils.teacher_path(args, run)
    if os.path.exists(path):
        print(f"teacher: {path}")
        teacher = utils.load_model(path, causal=False, device=device, expect=cfg)
        return teacher.eval().requires_grad_(False), utils.text_encoder_for(path, cfg, device)
    if args.teacher or cfg.name != "tiny":
        raise cv.CausVidError(f"teacher checkpoint {path!r} not found; pass --teacher PATH or --model-dir DIR")
    print(f"no teacher at {path}: pre-training the toy teacher for {cfg.teacher_train_steps} steps "
          "(it stands in for a pretrained video model)")
    text_encoder, teacher = toy.tiny_text_encoder(cfg), cv.DiT(cfg).to(device)
    utils.train_flow_matching(teacher, text_encoder, cfg, path, cfg.teacher_train_steps, cfg.lr_teacher, device,
                              args.seed, "teacher", cfg.ema_decay, resume=args.resume, save_every=args.save_every,
                              log_every=args.log_every)
    return teacher.requires_grad_(False), text_encoder.to(device)


@torch.no_grad()
def make_ode_pairs(teacher, text_encoder, cfg: cv.Config, n: int, device, seed: int, pool: list[str], batch: int = 64):
    """Sec. 4.3: teacher trajectories from noise (Euler, CFG with the negative prompt), kept at the
    student's timesteps, for prompts drawn from `pool` -> (trajectories (n, Q+1, F, C, H, W), prompts)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [pool[i] for i in torch.randint(0, len(pool), (n,), generator=g)]
    batch = min(batch, cfg.batch_size) if cfg.name != "tiny" else batch
    emb = utils.embed_prompts(text_encoder, prompts + [cfg.negative_prompt])
    uncond = emb[cfg.negative_prompt][None].to(device)
    trajectories = []
    for i in tqdm(range(0, n, batch), desc="ODE pairs"):
        p = prompts[i:i + batch]
        noise = torch.randn(len(p), cfg.num_frames, cfg.channels, cfg.height, cfg.width, generator=g).to(device)
        with utils.autocast(device):
            _, trajectory = cv.sample_ode(teacher, noise, utils.stack_text(emb, p, device), uncond, cfg.teacher_guidance,
                                          cfg.teacher_steps, cfg.shift, keep=cfg.student_step_indices)
        trajectories.append(trajectory.float().cpu())
    return torch.cat(trajectories), prompts


def get_ode_pairs(args, cfg: cv.Config, teacher, text_encoder, device, run: str):
    """The run's ODE pairs: reused when <run>/ode_pairs.safetensors holds enough of the same teacher's."""
    n, path, made_by = cfg.ode_pairs, os.path.join(run, "ode_pairs.safetensors"), ("exact" if args.exact_teacher else "trained")
    if os.path.exists(path):
        tensors, stored, meta = utils.load_checkpoint(path)
        utils.check_preset(stored, cfg, path)
        if meta.get("teacher", "trained") != made_by:
            raise cv.CausVidError(f"{path!r} holds pairs of the {meta.get('teacher', 'trained')} teacher, this run's "
                                  f"is the {made_by} one; pass another --run, or delete the file")
        if tensors["trajectories"].shape[0] >= n:
            print(f"ODE pairs: {path} ({n})")
            return tensors["trajectories"][:n], meta["prompts"][:n]
    pairs, prompts = make_ode_pairs(utils.real_score(teacher, text_encoder, cfg, args.exact_teacher), text_encoder,
                                    cfg, n, device, args.seed, utils.read_prompts(args.prompts, cfg))
    timesteps = cv.student_timesteps(cfg).tolist()
    utils.save_checkpoint(path, {"trajectories": pairs}, cfg, prompts=prompts, timesteps=timesteps, teacher=made_by)
    print(f"wrote {path}: {n} trajectories at t = {timesteps} and 0")
    return pairs, prompts


def regress_student(args, cfg: cv.Config, teacher, text_encoder, pairs, prompts, device, path: str):
    """Eq. 6 on the ODE pairs; the student starts from the teacher's weights with the causal mask."""
    student = cv.DiT(cfg, causal=True).to(device)
    student.load_state_dict(teacher.state_dict())
    student.gradient_checkpointing = cfg.gradient_checkpointing
    emb = utils.embed_prompts(text_encoder, prompts)
    timesteps = cv.student_timesteps(cfg)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr_ode, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    t0, steps = time.time(), cfg.ode_steps
    with utils.TrainLoop(path.replace(".safetensors", "_state.safetensors"), cfg, steps,
                         {"student": student, "opt": opt, "data": g}, args.resume, args.save_every, "ODE regression") as loop:
        for step in loop:
            idx = torch.randint(0, len(pairs), (cfg.batch_size,), generator=g)
            text = utils.stack_text(emb, [prompts[i] for i in idx], device)
            with utils.autocast(device):
                loss = cv.ode_regression_loss(student, pairs[idx].to(device), text, timesteps, cfg.chunk_size,
                                              cfg.clean_context)
            norm = utils.optimizer_step(loss, opt, student.parameters(), cfg.grad_clip)
            if (step + 1) % args.log_every == 0 or step + 1 == steps:
                utils.log("ode", step + 1, steps, t0, loss=loss.item(), grad_norm=norm)
        utils.save_model(path, student.eval(), text_encoder, stage="ode", steps=steps)
    print(f"wrote {path}")


def run(args, cfg: cv.Config, device, run_dir: str):
    """Stage 1 in full (train_dmd.py calls this when the run has no ode.safetensors yet)."""
    torch.manual_seed(args.seed)
    teacher, text_encoder = get_teacher(args, cfg, device, run_dir)
    pairs, prompts = get_ode_pairs(args, cfg, teacher, text_encoder, device, run_dir)
    regress_student(args, cfg, teacher, text_encoder, pairs, prompts, device, os.path.join(run_dir, "ode.safetensors"))


def main(argv=None):
    args = parse_args(argv)
    cfg, device, run_dir = utils.resolve(args)
    run(args, cfg, device, utils.writable_dir(run_dir, "--run"))


if __name__ == "__main__":
    utils.run_cli(main)
