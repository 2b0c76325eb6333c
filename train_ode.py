"""Stage 1 of CausVid: ODE initialisation of the block-causal student (Sec. 4.3, Eq. 6; Alg. 1 line 1).

  0. the bidirectional teacher s_data: --teacher PATH, <run>/teacher.safetensors, the official Wan
     directory (--model-dir), or on the toy world the teacher shipped in weights/ (a stand-in for a
     pretrained video model; --teacher-steps N pre-trains a new one here with flow matching);
  1. ODE pairs: the teacher's Euler + CFG trajectories from noise, kept at the student's timesteps;
  2. regression of the block-causal student (initialised from the teacher) onto the trajectories'
     end points, every chunk at its own step of Alg. 1's T = {0, t1..tQ} (Eq. 6): a chunk at t = 0
     is clean context for the chunks after it, as inference sees it.

Writes <run>/teacher.safetensors (if pre-trained here), <run>/ode_pairs/ (shards), <run>/ode.safetensors,
<run>/ode_log.jsonl.
"""

import argparse
import collections
import copy
import os
import time

import torch
from tqdm.auto import tqdm

import causvid as cv
import toy_world as toy
import training
import utils


def parse_args(argv=None):
    p = utils.add_training_args(utils.add_common_args(argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)))
    p.add_argument("--steps", "--ode-steps", dest="ode_steps", type=int,
                   help="ODE regression steps (default: the preset's ode_steps)")
    return p.parse_args(argv)


def get_teacher(args, cfg: cv.Config, device, run: str):
    """The bidirectional teacher s_data and its text encoder: loaded, or on the toy world pre-trained
    with flow matching (--teacher-steps)."""
    path = utils.teacher_path(args, run, cfg)
    if os.path.exists(path):
        print(f"teacher: {path}")
        teacher = utils.load_model(path, causal=False, device=device, expect=cfg)
        return teacher.eval().requires_grad_(False), utils.text_encoder_for(path, cfg, device)
    if args.teacher or cfg.name != "tiny":
        raise cv.CausVidError(f"teacher checkpoint {path!r} not found; pass --teacher PATH or --model-dir DIR")
    print(f"pre-training the toy teacher into {path} for {cfg.teacher_train_steps} steps (it stands in for a "
          "pretrained video model)")
    text_encoder, teacher = toy.tiny_text_encoder(cfg), cv.DiT(cfg).to(device)
    training.train_flow_matching(teacher, text_encoder, cfg, path, cfg.teacher_train_steps, cfg.lr_teacher, device,
                              args.seed, "teacher", cfg.ema_decay, resume=args.resume, save_every=args.save_every,
                              log_every=args.log_every)
    return teacher.requires_grad_(False), text_encoder.to(device)


def get_causal_teacher(args, cfg: cv.Config, teacher, text_encoder, device, run: str) -> cv.DiT:
    """Causal Forcing's teacher (Zhu et al., arXiv 2602.02214; thu-ml/Causal-Forcing): a block-causal
    diffusion model whose own sampler makes the ODE pairs, so that no chunk's target depends on the
    noise of the chunks after it. <run>/causal_diffusion.safetensors; else on the toy world the one
    shipped in weights/ -- unless --causal-teacher-steps N asks for one trained into the run: the
    teacher fine-tuned with the block mask by teacher forcing (cv.teacher_forcing_loss), EMA weights."""
    path = utils.causal_teacher_path(args, run, cfg)
    if os.path.exists(path):
        print(f"causal teacher: {path}")
        return utils.load_model(path, causal=True, device=device, expect=cfg).eval().requires_grad_(False)
    if cfg.name != "tiny":
        raise cv.CausVidError(f"causal_ode_init (--recipe causal-forcing) needs a causal diffusion model at {path!r}; "
                              "none is shipped or trained for Wan: put one there, or drop the option")
    print(f"training the causal teacher into {path} for {cfg.causal_teacher_steps} steps (teacher forcing)")
    model = copy.deepcopy(teacher).train().requires_grad_(True)
    model.causal = True
    training.train_flow_matching(model, text_encoder, cfg, path, cfg.causal_teacher_steps, cfg.lr_causal_teacher, device,
                              args.seed + 3, "causal teacher", cfg.ema_decay, teacher_forcing=True, resume=args.resume,
                              save_every=args.save_every, log_every=args.log_every)
    return model.requires_grad_(False)


def teacher_kind(args, cfg: cv.Config) -> str:
    """Who makes the ODE pairs: the trained (bidirectional) teacher, the exact toy one, or a causal one."""
    if args.exact_teacher and cfg.causal_ode_init:
        raise cv.CausVidError("--exact-teacher is bidirectional; it cannot make causal_ode_init's pairs: drop one")
    return "exact" if args.exact_teacher else "causal" if cfg.causal_ode_init else "trained"


@torch.no_grad()
def make_ode_pairs(args, cfg: cv.Config, teacher, text_encoder, device, path: str, batch: int = 64):
    """Sec. 4.3: the teacher's trajectories from noise (Euler, CFG with the negative prompt), kept at
    the student's timesteps, written shard by shard to `path`; shards already there are kept (a
    killed run resumes), and shard i's noise depends only on the seed and i."""
    pool, made_by = utils.read_prompts(args.prompts, cfg), teacher_kind(args, cfg)
    prompts = [pool[i] for i in torch.randint(0, len(pool), (cfg.ode_pairs,), generator=torch.Generator().manual_seed(args.seed))]
    batch = batch if cfg.name == "tiny" else min(batch, cfg.batch_size)
    emb = utils.embed_prompts(text_encoder, prompts + [cfg.negative_prompt])
    uncond, real = emb[cfg.negative_prompt][None].to(device), utils.real_score(teacher, text_encoder, cfg, args.exact_teacher)
    sampler = cv.sample_ode_causal if getattr(real, "causal", False) else cv.sample_ode  # Causal Forcing: chunk by chunk
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what the teacher computes in
    done = collections.Counter(shard for shard, _ in training.ODEPairs(path).rows)  # rows per shard written
    pending = [b for b in range(0, cfg.ode_pairs, batch)
               if done[training.ODEPairs.shard(path, b // batch)] < len(prompts[b:b + batch])]
    training.barrier()  # every rank has listed the missing shards before any is written
    for b in tqdm(pending[training.rank()::training.world()], desc="ODE pairs", disable=training.rank() > 0):
        p = prompts[b:b + batch]  # the shards still missing, split evenly over the ranks
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + b // batch)
        noise = torch.randn(len(p), cfg.num_frames, cfg.channels, cfg.height, cfg.width, generator=g).to(device)
        with utils.autocast(device):
            _, trajectory = sampler(real, noise, utils.stack_text(emb, p, device), uncond, cfg.teacher_guidance,
                                    cfg.teacher_steps, cfg.shift, keep=cfg.student_step_indices)
        utils.save_checkpoint(training.ODEPairs.shard(path, b // batch), {"trajectories": trajectory.to(dtype)}, cfg,
                              prompts=p, teacher=made_by, timesteps=cv.student_timesteps(cfg).tolist())


def get_ode_pairs(args, cfg: cv.Config, teacher, text_encoder, device, run: str) -> training.ODEPairs:
    """The run's ODE pairs, <run>/ode_pairs/: made (or completed) if there are fewer than cfg.ode_pairs."""
    path, made_by = os.path.join(run, "ode_pairs"), teacher_kind(args, cfg)
    pairs = training.ODEPairs(path)
    if len(pairs):
        utils.check_preset(pairs.cfg, cfg, path)
        if pairs.teachers != {made_by}:
            raise cv.CausVidError(f"{path!r} holds pairs of the {'/'.join(sorted(pairs.teachers))} teacher, this run's "
                                  f"is the {made_by} one; pass another --run-dir, or delete the directory")
    if len(pairs) < cfg.ode_pairs:
        make_ode_pairs(args, cfg, teacher, text_encoder, device, path)
        training.barrier()  # every rank's shards are written
        pairs = training.ODEPairs(path)
        if len(pairs) < cfg.ode_pairs:
            raise cv.CausVidError(f"{path!r} holds {len(pairs)} of {cfg.ode_pairs} pairs after making them; is the "
                                  "run directory on a filesystem every node shares?")
        print(f"wrote {path}: {len(pairs)} trajectories at t = {cv.student_timesteps(cfg).tolist()} and 0")
    else:
        print(f"ODE pairs: {path} ({cfg.ode_pairs} of {len(pairs)})")
    return pairs


def ode_step(student, opt, micro_batch, timesteps, cfg: cv.Config, device, streams: training.Streams) -> tuple[float, float]:
    """One step of Eq. 6 over this rank's cfg.accumulate micro-batches, micro_batch(generator) ->
    (trajectories, text), each drawing from its own streams -> (loss, grad norm) over all of them."""
    losses = []
    for a in range(cfg.accumulate):
        with streams.use(a) as g, training.gradient_sync(student, a + 1 == cfg.accumulate):
            trajectory, text = micro_batch(g)
            with utils.autocast(device):
                loss = cv.ode_regression_loss(student, trajectory, text, timesteps, cfg.chunk_size, cfg.clean_context)
            losses.append(training.backward(loss, 1 / cfg.accumulate))
    return sum(losses) / len(losses), training.apply_gradients(opt, student.parameters(), cfg.grad_clip)


def regress_student(args, cfg: cv.Config, teacher, text_encoder, pairs: training.ODEPairs, device, path: str):
    """Eq. 6 on the first cfg.ode_pairs ODE pairs; the student starts from the teacher's weights with
    the causal mask (sharded over the ranks under torchrun)."""
    student = cv.DiT(cfg, causal=True).to(device)
    student.load_state_dict(teacher.state_dict())
    student.gradient_checkpointing = cfg.gradient_checkpointing
    student = training.shard(student)
    emb = utils.embed_prompts(text_encoder, pairs.prompts[:cfg.ode_pairs])
    timesteps = cv.student_timesteps(cfg)
    opt, streams = training.adamw(student.parameters(), cfg.lr_ode, device), training.Streams(args.seed + 1, cfg.accumulate)

    def micro_batch(g):
        idx = torch.randint(0, cfg.ode_pairs, (cfg.batch_size,), generator=g)
        return pairs.get(idx).to(device), utils.stack_text(emb, [pairs.prompts[i] for i in idx], device)

    t0, steps = time.time(), cfg.ode_steps
    with training.TrainLoop(path.replace(".safetensors", "_state"), cfg, steps,
                         {"student": student, "opt": opt, "data": streams}, args.resume, args.save_every,
                         "ODE regression") as loop:
        log_path = os.path.join(os.path.dirname(path), "ode_log.jsonl")  # every log line, as JSON
        if training.rank() == 0 and loop.first_step == 0:
            open(log_path, "w").close()
        for step in loop:
            loss, norm = ode_step(student, opt, micro_batch, timesteps, cfg, device, streams)
            if (step + 1) % args.log_every == 0 or step + 1 == steps:
                training.log("ode", step + 1, steps, t0, log_path, loss=loss, grad_norm=norm)
        training.save_model(path, student.eval(), text_encoder, stage="ode", steps=steps)
    print(f"wrote {path}")


def run(args, cfg: cv.Config, device, run_dir: str):
    """Stage 1 in full (train_dmd.py calls this when the run has no ode.safetensors yet)."""
    torch.manual_seed(args.seed)
    teacher, text_encoder = get_teacher(args, cfg, device, run_dir)
    if cfg.causal_ode_init:  # Causal Forcing: the pairs, and the student's first weights, are the causal model's
        teacher = get_causal_teacher(args, cfg, teacher, text_encoder, device, run_dir)
    pairs = get_ode_pairs(args, cfg, teacher, text_encoder, device, run_dir)
    regress_student(args, cfg, teacher, text_encoder, pairs, device, os.path.join(run_dir, "ode.safetensors"))


def main(argv=None):
    args = parse_args(argv)
    cfg, device, run_dir = utils.resolve(args)
    run(args, cfg, training.init_distributed(device), utils.writable_dir(run_dir, "--run-dir"))


if __name__ == "__main__":
    utils.run_cli(main)
