"""Stage 1 of CausVid: ODE initialisation of the block-causal student (Sec. 4.3, Eq. 6; Alg. 1
line 1).

  0. the bidirectional teacher s_data: --teacher PATH, <run>/teacher.safetensors, the official Wan
     directory (--model-dir), or on the toy world the teacher shipped in weights/ (a stand-in for a
     pretrained video model; --teacher-steps N pre-trains a new one here with flow matching);
  1. ODE pairs: the teacher's Euler + CFG trajectories from noise, kept at the student's timesteps;
  2. regression of the block-causal student (initialised from the teacher) onto the trajectories'
     end points, every chunk at its own step of Alg. 1's T = {0, t1..tQ} (Eq. 6): a chunk at t = 0
     is clean context for the chunks after it, as inference sees it.
With --set causal_ode_init=true (Causal Forcing, successors.py) a causal teacher makes the pairs;
with --set consistency_init=true (Causal Forcing++) stage 1 is consistency distillation of that
causal teacher on the world's clips instead of pairs and regression (the toy world).

Writes <run>/teacher.safetensors (if pre-trained here), <run>/ode_pairs/ (shards),
<run>/ode.safetensors, <run>/ode_log.jsonl.
"""

import argparse
import collections
import copy
import os
import time

import torch
from tqdm.auto import tqdm

import causvid as cv
import successors
import training
import utils


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    utils.add_training_args(utils.add_common_args(p))
    p.add_argument(
        "--steps",
        "--ode-steps",
        dest="ode_steps",
        type=int,
        help="ODE regression steps (default: the preset's ode_steps)",
    )
    return p.parse_args(argv)


def get_teacher(args, world, run: str):
    """The bidirectional teacher s_data and its text encoder: loaded, or pre-trained with flow
    matching on the world's clips (the toy world: --teacher-steps)."""
    path = utils.teacher_path(args, run, world)
    if os.path.exists(path):
        print(f"teacher: {path}")
        teacher = utils.load_model(path, causal=False, device=world.device, expect=world.cfg)
        return teacher.eval().requires_grad_(False), world.text_encoder(path)
    if args.teacher or world.clips is None:
        raise cv.CausVidError(
            f"teacher checkpoint {path!r} not found; pass --teacher PATH or --model-dir DIR"
        )
    cfg = world.cfg
    print(
        f"pre-training the toy teacher into {path} for {cfg.teacher_train_steps} steps (it stands "
        "in for a pretrained video model)"
    )
    text_encoder = world.text_encoder().cpu()  # a fresh one, saved with the teacher
    teacher = cv.DiT(cfg).to(world.device)
    job = training.Pretraining(
        stage="teacher",
        steps=cfg.teacher_train_steps,
        lr=cfg.lr_teacher,
        seed=args.seed,
        loss=training.clip_flow_matching,
    )
    training.train_flow_matching(
        teacher, text_encoder, job, world, path, training.LoopFlags.of(args)
    )
    return teacher.requires_grad_(False), text_encoder.to(world.device)


def get_causal_teacher(args, world, teacher, text_encoder, run: str) -> cv.DiT:
    """Causal Forcing's teacher (successors.py, 2): a block-causal diffusion model whose own sampler
    makes the ODE pairs. <run>/causal_diffusion.safetensors; else the world's (on the toy world the
    one shipped in weights/) -- unless --causal-teacher-steps N asks for one trained into the run:
    the teacher fine-tuned with the block mask by teacher forcing, EMA weights."""
    path = utils.causal_teacher_path(args, run, world)
    if os.path.exists(path):
        print(f"causal teacher: {path}")
        model = utils.load_model(path, causal=True, device=world.device, expect=world.cfg)
        return model.eval().requires_grad_(False)
    if world.clips is None:
        raise cv.CausVidError(
            "causal_ode_init (--recipe causal-forcing) needs a causal diffusion model at "
            f"{path!r}; "
            f"none is shipped or trained for {world.name}: put one there, or drop the option"
        )
    cfg = world.cfg
    print(
        f"training the causal teacher into {path} for {cfg.causal_teacher_steps} steps "
        "(teacher forcing)"
    )
    model = copy.deepcopy(teacher).train().requires_grad_(True)
    model.causal = True
    job = training.Pretraining(
        stage="causal teacher",
        steps=cfg.causal_teacher_steps,
        lr=cfg.lr_causal_teacher,
        seed=args.seed + 3,
        loss=successors.teacher_forcing_step,
    )
    training.train_flow_matching(model, text_encoder, job, world, path, training.LoopFlags.of(args))
    return model.requires_grad_(False)


def teacher_kind(args, cfg: cv.Config) -> str:
    """Who makes the ODE pairs: the trained (bidirectional) teacher, the exact toy one, or a
    causal one."""
    if args.exact_teacher and cfg.causal_ode_init:
        raise cv.CausVidError(
            "--exact-teacher is bidirectional; it cannot make causal_ode_init's pairs: drop one"
        )
    if args.exact_teacher:
        return "exact"
    if cfg.causal_ode_init:
        return "causal"
    return "trained"


def pair_schedule(cfg) -> tuple[int, list[int]]:
    """The teacher's Euler steps for the ODE pairs and the indices it keeps: every
    ode_pair_stride-th point of its teacher_steps schedule, so the kept states sit at the student's
    timesteps exactly (the shift maps the same s to the same t) for 1 / stride of the forwards."""
    stride = cfg.ode_pair_stride
    if (
        stride < 1
        or cfg.teacher_steps % stride
        or any(i % stride for i in cfg.student_step_indices)
    ):
        raise cv.CausVidError(
            f"ode_pair_stride {stride} must divide teacher_steps ({cfg.teacher_steps}) and each of "
            f"student_step_indices {cfg.student_step_indices}; --set ode_pair_stride=1 always does"
        )
    return cfg.teacher_steps // stride, [i // stride for i in cfg.student_step_indices]


@torch.no_grad()
def make_ode_pairs(args, world, teacher, text_encoder, path: str):
    """Sec. 4.3: the teacher's trajectories from noise (Euler, CFG with the negative prompt), kept
    at the student's timesteps, written shard by shard to `path`; shards already there are kept (a
    killed run resumes), and shard i's noise depends only on the seed and i."""
    cfg = world.cfg
    device = world.device
    batch = world.pairs_batch
    pool = utils.read_prompts(args.prompts, world)
    draw = torch.randint(
        0, len(pool), (cfg.ode_pairs,), generator=torch.Generator().manual_seed(args.seed)
    )
    prompts = [pool[i] for i in draw]
    emb = text_encoder.embed(prompts + [cfg.negative_prompt])
    uncond = emb[cfg.negative_prompt][None].to(device)
    real = world.exact_teacher(text_encoder) if args.exact_teacher else teacher
    # a bidirectional teacher samples the whole clip; a causal one (Causal Forcing) chunk by chunk
    sampler = cv.sample_ode_causal if getattr(real, "causal", False) else cv.sample_ode
    steps, keep = pair_schedule(cfg)
    # the pairs are stored in bf16 on a GPU (what the teacher computes in there), else in fp32
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    done = collections.Counter(shard for shard, _ in training.ODEPairs(path).rows)  # rows per shard
    shards = range(0, cfg.ode_pairs, batch)
    pending = [
        b
        for b in shards
        if done[training.ODEPairs.shard(path, b // batch)] < len(prompts[b : b + batch])
    ]
    training.barrier()  # every rank has listed the missing shards before any is written
    mine = pending[training.rank() :: training.world()]  # split evenly over the ranks
    for b in tqdm(mine, desc="ODE pairs", disable=training.rank() > 0):
        p = prompts[b : b + batch]
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + b // batch)
        shape = (len(p), cfg.num_frames, cfg.channels, cfg.height, cfg.width)
        noise = torch.randn(shape, generator=g).to(device)
        with utils.autocast(device, training=True):  # training data: bf16 where native
            _, trajectory = sampler(
                real,
                noise,
                utils.stack_text(emb, p, device),
                uncond,
                guidance=cfg.teacher_guidance,
                steps=steps,
                shift=cfg.shift,
                keep=keep,
            )
        utils.save_checkpoint(
            training.ODEPairs.shard(path, b // batch),
            {"trajectories": trajectory.to(dtype)},
            cfg,
            prompts=p,
            teacher=teacher_kind(args, cfg),
            euler_steps=steps,
            timesteps=cv.student_timesteps(cfg).tolist(),
        )


def get_ode_pairs(args, world, teacher, text_encoder, run: str) -> training.ODEPairs:
    """The run's ODE pairs, <run>/ode_pairs/: made (or completed) if there are fewer than asked."""
    cfg = world.cfg
    path = os.path.join(run, "ode_pairs")
    made_by = teacher_kind(args, cfg)
    pairs = training.ODEPairs(path)
    if len(pairs):
        utils.check_preset(pairs.cfg, cfg, path)
        if pairs.teachers != {made_by}:
            raise cv.CausVidError(
                f"{path!r} holds pairs of the {'/'.join(sorted(pairs.teachers))} teacher, "
                "this run's "
                f"is the {made_by} one; pass another --run-dir, or delete the directory"
            )
        steps = pair_schedule(cfg)[0]
        if pairs.euler_steps != {steps}:
            made = "/".join(map(str, sorted(pairs.euler_steps)))
            raise cv.CausVidError(
                f"{path!r} holds pairs made with {made} Euler steps, this run makes them with "
                f"{steps} (ode_pair_stride {cfg.ode_pair_stride}); pass another --run-dir, delete "
                "the directory, or set the stride they were made with"
            )
    if len(pairs) >= cfg.ode_pairs:
        print(f"ODE pairs: {path} ({cfg.ode_pairs} of {len(pairs)})")
        return pairs
    make_ode_pairs(args, world, teacher, text_encoder, path)
    training.barrier()  # every rank's shards are written
    pairs = training.ODEPairs(path)
    if len(pairs) < cfg.ode_pairs:
        raise cv.CausVidError(
            f"{path!r} holds {len(pairs)} of {cfg.ode_pairs} pairs after making them; is the run "
            "directory on a filesystem every node shares?"
        )
    print(
        f"wrote {path}: {len(pairs)} trajectories at t = {cv.student_timesteps(cfg).tolist()} and 0"
    )
    return pairs


def ode_step(student, opt, micro_batch, timesteps, cfg: cv.Config, streams) -> tuple[float, float]:
    """One step of Eq. 6 over this rank's micro-batches, micro_batch(rng) -> (trajectories, text).
    -> (the loss, averaged over micro-batches and ranks; the gradient norm)."""
    losses = []
    for rng in training.micro_batches(streams, student):  # accumulation and rank sync
        trajectory, text = micro_batch(rng)
        with utils.autocast(trajectory.device, training=True):  # each chunk at its own step
            loss = cv.ode_regression_loss(
                student, trajectory, text, timesteps, cfg.chunk_size, cfg.clean_context
            )
        losses.append(training.backward(loss, 1 / cfg.accumulate))
    norm = training.apply_gradients(opt, student.parameters(), cfg.grad_clip)
    return sum(losses) / len(losses), norm


def stage_one_loop(args, cfg: cv.Config, path: str, state: dict, desc: str) -> training.TrainLoop:
    """Stage 1's resumable loop over ode_steps, its state beside `path`; a fresh run empties the
    log <run>/ode_log.jsonl (a resumed one appends)."""
    loop = training.TrainLoop(
        path.replace(".safetensors", "_state"),
        cfg,
        cfg.ode_steps,
        state,
        resume=args.resume,
        save_every=args.save_every,
        desc=desc,
    )
    if training.rank() == 0 and loop.first_step == 0:
        open(os.path.join(os.path.dirname(path), "ode_log.jsonl"), "w").close()
    return loop


def regress_student(args, world, teacher, text_encoder, pairs: training.ODEPairs, path: str):
    """Eq. 6 on the first cfg.ode_pairs ODE pairs; the student starts from the teacher's weights
    with the causal mask (sharded over the ranks under torchrun)."""
    cfg, device = world.cfg, world.device
    student = cv.DiT(cfg, causal=True).to(device)
    student.load_state_dict(teacher.state_dict())
    student.gradient_checkpointing = cfg.gradient_checkpointing
    student = training.shard(student)
    emb = text_encoder.embed(pairs.prompts[: cfg.ode_pairs])
    timesteps = cv.student_timesteps(cfg)
    opt = training.adamw(student.parameters(), cfg.lr_ode, device)
    streams = training.Streams(args.seed + 1, cfg.accumulate)
    log_path = os.path.join(os.path.dirname(path), "ode_log.jsonl")  # every log line, as JSON

    def micro_batch(rng):  # Eq. 6's data: ODE trajectories and their prompts
        idx = torch.randint(0, cfg.ode_pairs, (cfg.batch_size,), generator=rng)
        text = utils.stack_text(emb, [pairs.prompts[i] for i in idx], device)
        return pairs.get(idx).to(device), text

    t0 = time.time()
    state = {"student": student, "opt": opt, "data": streams}
    loop = stage_one_loop(args, cfg, path, state, "ODE regression")
    with loop:
        for step in loop:
            loss, norm = ode_step(student, opt, micro_batch, timesteps, cfg, streams)
            if (step + 1) % args.log_every == 0 or step + 1 == cfg.ode_steps:
                training.log(
                    "ode", step + 1, cfg.ode_steps, t0, log_path, loss=loss, grad_norm=norm
                )
        training.save_model(path, student.eval(), text_encoder, stage="ode", steps=cfg.ode_steps)
    print(f"wrote {path}")


def distil_consistency(args, world, teacher, text_encoder, path: str):
    """Causal Forcing++ (successors.py, 5): stage 1 by causal consistency distillation of the causal
    teacher on the world's clips, in place of ODE pairs and Eq. 6. Student, target (its EMA) and
    teacher start from the causal teacher's weights; their Adam (beta1 0); ode_steps at lr_ode.
    Saves the target's weights, as they do."""
    cfg, device = world.cfg, world.device
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    target = training.ema(student, cfg.consistency_ema)
    target.update_parameters(student)  # (its first update copies)
    emb = text_encoder.embed(list(world.prompts) + [cfg.negative_prompt])
    uncond = emb[cfg.negative_prompt][None].to(device)
    opt = training.adamw(student.parameters(), cfg.lr_ode, device, betas=(0.0, 0.999))
    g = torch.Generator().manual_seed(args.seed + 1)
    state = {"student": student, "target": target, "opt": opt, "data": g}
    log_path = os.path.join(os.path.dirname(path), "ode_log.jsonl")
    t0 = time.time()
    loop = stage_one_loop(args, cfg, path, state, "consistency distillation")
    with loop:
        for step in loop:
            x0, prompts = world.clips(cfg.batch_size, g)
            text = utils.stack_text(emb, prompts, device)
            with utils.autocast(device, training=True):
                loss = successors.consistency_step(
                    student, target.module, teacher, x0.to(device), text, uncond, cfg, g
                )
            norm = training.optimizer_step(loss, opt, student.parameters(), cfg.grad_clip)
            target.update_parameters(student)
            if (step + 1) % args.log_every == 0 or step + 1 == cfg.ode_steps:
                training.log(
                    "consistency",
                    step + 1,
                    cfg.ode_steps,
                    t0,
                    log_path,
                    loss=loss.item(),
                    grad_norm=norm,
                )
        student.load_state_dict(target.module.state_dict())
        training.save_model(path, student.eval(), text_encoder, stage="ode", steps=cfg.ode_steps)
    print(f"wrote {path}")


def run(args, world, run_dir: str):
    """Stage 1 in full (train_dmd.py calls this when the run has no ode.safetensors yet)."""
    if world.cfg.consistency_init and (world.clips is None or training.world() > 1):
        raise cv.CausVidError(
            "consistency_init distils on data clips in one process: the toy world, with python "
            "(not torchrun); on Wan drop it for ODE pairs"
        )
    torch.manual_seed(args.seed)
    teacher, text_encoder = get_teacher(args, world, run_dir)
    path = os.path.join(run_dir, "ode.safetensors")
    if world.cfg.causal_ode_init or world.cfg.consistency_init:
        # Causal Forcing: the causal teacher makes the pairs and gives the student its first weights
        teacher = get_causal_teacher(args, world, teacher, text_encoder, run_dir)
    if world.cfg.consistency_init:  # Causal Forcing++: consistency distillation, no pairs
        return distil_consistency(args, world, teacher, text_encoder, path)
    pairs = get_ode_pairs(args, world, teacher, text_encoder, run_dir)
    regress_student(args, world, teacher, text_encoder, pairs, path)


def main(argv=None):
    args = parse_args(argv)
    cfg, device, run_dir = utils.resolve(args)
    device = training.init_distributed(device)
    world = utils.make_world(cfg, device, args.model_dir)
    run(args, world, utils.writable_dir(run_dir, "--run-dir"))


if __name__ == "__main__":
    utils.run_cli(main)
