"""Stage 2 of CausVid: asymmetric distribution matching distillation (Sec. 3.2, 4.2; Alg. 1; Eq. 4).

The block-causal generator G (from stage 1) learns to make videos whose noised versions the frozen
bidirectional teacher (s_data, the "real" score, with CFG) and a critic trained online on G's own
samples (s_gen, the "fake" score, initialised from the teacher) disagree about as little as
possible. Generator inputs are data clips noised per chunk to random student steps (Alg. 1 lines
4-7), a chunk also left clean (t = 0) at times, as context the way inference sees it (clean_context);
or, with --set backward_simulation=true, the states of the student's own streamed rollout (DMD2
Sec. 4.5). The critic takes critic_updates_per_generator steps per generator step (DMD2's two
time-scale update rule). With --tiny and no stage-1 checkpoint, stage 1 (train_ode.py) runs first,
so this one command trains everything.

Writes <out>/dmd.safetensors and <out>/dmd_samples_<iteration>.gif every --sample-every iterations.
"""

import argparse
import copy
import dataclasses
import os
import time

import torch
from tqdm.auto import tqdm

import causvid as cv
import train_ode


def parse_args(argv=None):
    p = cv.add_training_args(cv.add_common_args(argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)))
    p.add_argument("--steps", type=int, help="DMD iterations, each a critic update; the generator is updated "
                                             "every critic_updates_per_generator-th (default: the preset's)")
    p.add_argument("--ode", help="the generator's initialisation: the stage-1 student (default: "
                                 "<out>/ode.safetensors); a teacher checkpoint here is 'DMD without ODE init'")
    p.add_argument("--teacher", help="bidirectional teacher checkpoint (default: <out>/teacher.safetensors)")
    p.add_argument("--ode-steps", type=int, help="stage-1 steps, if stage 1 runs first (default: the preset's)")
    p.add_argument("--teacher-steps", type=int, help="toy teacher pre-training steps, if it runs first")
    p.add_argument("--pairs", type=int, help="ODE pairs, if stage 1 runs first (default: the preset's)")
    p.add_argument("--log-every", type=int, default=50, help="iterations between log lines (default: 50)")
    p.add_argument("--sample-every", type=int, default=500, help="iterations between sample GIFs (default: 500)")
    return p.parse_args(argv)


@torch.no_grad()
def write_samples(generator, emb, cfg, path, device, seed=0):
    """A few streamed toy samples as a GIF, so a person can watch training progress."""
    prompts = cv.PROMPTS[::6]
    text = torch.stack([emb[p] for p in prompts]).to(device)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), cfg.num_frames, cfg.channels, cfg.height, cfg.width, generator=g).to(device)
    generator.eval()
    video = torch.cat(list(cv.stream_generate(generator, noise, text, cv.student_timesteps(cfg).to(device), g)), 1)
    generator.train()
    cv.write_video(path, cv.to_uint8(video))


def main(argv=None):
    args = parse_args(argv)
    cfg, device, out = cv.resolve_common(args)
    torch.manual_seed(args.seed)
    ode_path = args.ode or os.path.join(out, "ode.safetensors")
    teacher_path = args.teacher or os.path.join(out, "teacher.safetensors")
    if not args.teacher and not os.path.exists(teacher_path) and args.model_dir:
        teacher_path = args.model_dir  # the official Wan2.1 weights are the teacher
    if not os.path.exists(ode_path):
        if args.ode or cfg.name != "tiny":
            raise cv.CausVidError(f"stage-1 checkpoint {ode_path!r} not found; run train_ode.py first")
        print(f"no stage-1 checkpoint at {ode_path}: running train_ode.py first")
        stage1 = ["--tiny", "--out", out, "--seed", str(args.seed), "--log-every", str(args.log_every),
                  "--save-every", str(args.save_every)] + ["--resume"] * args.resume
        for flag, value in [("--device", args.device), ("--steps", args.ode_steps), ("--teacher", args.teacher),
                            ("--teacher-steps", args.teacher_steps), ("--pairs", args.pairs),
                            ("--batch-size", args.batch_size)]:
            stage1 += [flag, str(value)] if value is not None else []
        stage1 += [arg for item in args.set for arg in ("--set", item)]  # e.g. the teacher's lr_teacher
        train_ode.main(stage1)

    B = cfg.batch_size
    print(f"generator init: {ode_path} | teacher and critic init: {teacher_path}")
    generator = cv.load_model(ode_path, causal=True, device=device, expect=cfg).train()
    # the real score keeps the role it was trained in: bidirectional (CausVid), or a causal diffusion
    # model (the "causal teacher" ablation of Table 4); the critic starts as a copy of it
    teacher = cv.load_model(teacher_path, device=device, expect=cfg).eval().requires_grad_(False)
    critic = copy.deepcopy(teacher).train().requires_grad_(True)  # Alg. 1 line 2: s_gen starts as s_data
    if device.type == "cuda" and cfg.name != "tiny":
        teacher.to(torch.bfloat16)  # frozen: bf16 weights suffice, and no optimizer state
    text_encoder = cv.text_encoder_for(teacher_path, cfg, cv.text_dtype(device)).to(device)
    teacher = cv.teacher_role(teacher, text_encoder, cfg)  # the real score (exact_teacher: the toy world's own)
    g = torch.Generator().manual_seed(args.seed + 2)
    if cfg.name == "tiny":  # Alg. 1 line 4's data: the toy renderer
        def data():
            return cv.toy_batch(B, cfg.num_frames, g)
        pool = cv.PROMPTS
    else:  # Wan: the teacher's ODE end points (stage 1's pairs) stand in for a video dataset
        pairs_path = os.path.join(out, "ode_pairs.safetensors")
        tensors, _, meta = cv.load_checkpoint(pairs_path)
        clips, pool = tensors["trajectories"][:, -1], meta["prompts"]

        def data():
            i = torch.randint(0, len(pool), (B,), generator=g)
            return clips[i], [pool[j] for j in i]
    emb = cv.embed_prompts(text_encoder, list(pool) + [cfg.negative_prompt])  # encoded once, kept on the CPU
    uncond = emb[cfg.negative_prompt][None].to(device)
    if cfg.name != "tiny":  # UMT5-XXL's GPU memory goes back before training starts
        text_encoder = None
        torch.cuda.empty_cache() if device.type == "cuda" else None
    generator.gradient_checkpointing = critic.gradient_checkpointing = cfg.gradient_checkpointing

    opt_g = torch.optim.AdamW(generator.parameters(), lr=cfg.lr_generator, betas=(0.9, 0.999), weight_decay=0.0)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=cfg.lr_critic, betas=(0.9, 0.999), weight_decay=0.0)
    timesteps = cv.student_timesteps(cfg).to(device)
    steps, ratio = args.steps or cfg.dmd_steps, cfg.critic_updates_per_generator
    t0, logs = time.time(), {}
    state = {"generator": generator, "critic": critic, "opt_g": opt_g, "opt_c": opt_c, "data": g}
    with cv.TrainLoop(os.path.join(out, "dmd_state.safetensors"), cfg, steps, state, args.resume, args.save_every,
                      "DMD") as loop:
        for it in loop:
            x_data, prompts = data()  # line 4
            text = torch.stack([emb[p] for p in prompts]).to(device)
            generator_turn = it % ratio == 0
            with cv.autocast(device, training=True), torch.set_grad_enabled(generator_turn):
                if cfg.backward_simulation:  # DMD2 Sec. 4.5: the inputs come from the student's own rollout
                    noise = torch.randn(x_data.shape, generator=g).to(device)
                    states = cv.backward_simulation(generator, noise, text, timesteps, g)
                    x_t, t = cv.chunkwise_states(states, timesteps, cfg.chunk_size, cfg.clean_context)
                    x0 = cv.predict_x0(generator, x_t, t, text)
                else:
                    x0 = cv.generator_x0(generator, x_data.to(device), text, timesteps, cfg.chunk_size,  # lines 5-7
                                         cfg.clean_context)
            if generator_turn:  # lines 8-10
                with cv.autocast(device, training=True):
                    loss_g, info = cv.dmd_loss(x0, teacher, critic, text, uncond, cfg)
                logs.update(dmd=loss_g.item(), gen_grad=cv.optimizer_step(loss_g, opt_g, generator.parameters(),
                                                                           cfg.grad_clip), **info)
            with cv.autocast(device, training=True):  # lines 11-14
                loss_c = cv.critic_loss(critic, x0, text, cfg)
            logs.update(critic=loss_c.item(), critic_grad=cv.optimizer_step(loss_c, opt_c, critic.parameters(),
                                                                             cfg.grad_clip))
            if (it + 1) % args.log_every == 0 or it + 1 == steps:
                train_ode.log("dmd", it + 1, steps, t0, **logs)
            if cfg.name == "tiny" and ((it + 1) % args.sample_every == 0 or it + 1 == steps):
                path = os.path.join(out, f"dmd_samples_{it + 1:06d}.gif")
                write_samples(generator, emb, cfg, path, device)
                tqdm.write(f"wrote {path}")
        path = os.path.join(out, "dmd.safetensors")
        # the generator's config is stage 1's; the settings this run trained with go in as run_config
        cv.save_model(path, generator.eval(), text_encoder, stage="dmd", steps=steps,
                      run_config=dataclasses.asdict(cfg))
        print(f"wrote {path}")


if __name__ == "__main__":
    cv.run_cli(main)
