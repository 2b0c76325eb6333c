"""Stage 2 of CausVid: asymmetric distribution matching distillation (Sec. 3.2, 4.2; Alg. 1; Eq. 4).

The block-causal generator G (from stage 1) learns to make videos whose noised versions the frozen
bidirectional teacher (s_data, the "real" score, with CFG) and a critic trained online on G's own
samples (s_gen, the "fake" score, initialised from the teacher) disagree about as little as
possible. Generator inputs are data clips noised per chunk to random steps of T = {0, t1..tQ}
(Alg. 1 lines 4-7); with --set backward_simulation=true the states of the student's own streamed
rollout (DMD2 Sec. 4.5); with --set self_forcing=true the rollout itself (Self-Forcing,
successors.py). The critic takes critic_updates_per_generator steps per generator step (DMD2's two
time-scale update rule). With --tiny and no stage-1 checkpoint, stage 1 (train_ode.py) runs first,
so this one command trains everything.

Writes <run>/dmd.safetensors, <run>/dmd_log.jsonl (each log line's means, training.dmd_diagnostics's
included) and on the toy world <run>/dmd_samples_<iteration>.gif every --sample-every; on the toy
world it ends with the scores of the teacher, the ODE and the DMD student, and <run>/scorecard.gif.
"""

import argparse
import collections
import copy
import dataclasses
import os
import time

import torch
from tqdm.auto import tqdm

import causvid as cv
import successors
import train_ode
import training
import utils

LOGGED = ("dmd", "critic", "critic_fm", "teacher_fm", "distance", "gen_grad", "critic_grad")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    utils.add_training_args(utils.add_common_args(p))
    p.add_argument(
        "--steps",
        "--dmd-steps",
        dest="dmd_steps",
        type=int,
        help="DMD iterations, each a critic update; the generator steps every "
        "critic_updates_per_generator-th (default: the preset's)",
    )
    p.add_argument(
        "--ode",
        help="the generator's initialisation: the stage-1 student (default: "
        "<run>/ode.safetensors); a teacher checkpoint here is 'DMD without ODE init'",
    )
    p.add_argument(
        "--ode-steps",
        type=int,
        help="stage-1 regression steps, if stage 1 runs first (default: the preset's)",
    )
    p.add_argument(
        "--sample-every",
        type=int,
        default=500,
        help="iterations between sample GIFs (default: 500)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        help="also keep the generator (not its EMA) every N iterations, critic warm-up included, "
        "as <run>/dmd_<iteration>.safetensors (a length curve)",
    )
    p.add_argument(
        "--scorecard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on the toy world, end by sampling the teacher, the ODE and the DMD student once per "
        "prompt: their scores as a table and <run>/scorecard.gif (default: on)",
    )
    p.set_defaults(log_every=50)
    return p.parse_args(argv)


@dataclasses.dataclass
class DMD:
    """What Alg. 1 works with, set up once (main)."""

    generator: torch.nn.Module  # G, from stage 1
    critic: torch.nn.Module  # s_gen, from the teacher
    real: torch.nn.Module  # s_data, the frozen teacher
    opt_g: torch.optim.Optimizer
    opt_c: torch.optim.Optimizer
    videos: object  # rng -> (videos, text): Alg. 1 line 4
    generator_input: object  # Alg. 1 lines 5-7 (or a successor's): see generator_inputs
    uncond: torch.Tensor  # the negative prompt's embedding, CFG's "unconditional" text
    timesteps: torch.Tensor  # the student's steps
    streams: training.Streams  # each micro-batch's random streams
    cfg: cv.Config
    device: torch.device


def generator_turn(it: int, cfg: cv.Config) -> bool:
    """DMD2's two time-scale rule: the critic learns every iteration, the generator every
    critic_updates_per_generator-th after the first critic_warmup (the critic alone)."""
    if it < cfg.critic_warmup:
        return False
    return (it - cfg.critic_warmup) % cfg.critic_updates_per_generator == 0


def noise_level(x0: torch.Tensor, cfg: cv.Config, device) -> torch.Tensor:
    """Alg. 1 line 8's t, one per video (B, F): U[0, 1000) shifted (dmd_shift or shift), clamped."""
    shift = cfg.dmd_shift or cfg.shift
    return cv.dmd_timesteps(len(x0), x0.shape[1], shift, cfg.dmd_t_min, cfg.dmd_t_max, device)


def diagnostics(s: DMD, x0, t_in, grad, t, text) -> dict:
    """What DMD sees on a batch (training.dmd_diagnostics): the critic's and the teacher's fit to
    G's samples, the gradient per chunk and per student step."""
    with torch.no_grad():
        return training.dmd_diagnostics(
            x0, t_in, grad, t, s.real, s.critic, text, s.timesteps, s.cfg.chunk_size
        )


def dmd_iteration(it: int, s: DMD) -> dict:
    """One iteration of Alg. 1 (lines 4-14) over this rank's cfg.accumulate micro-batches.
    -> what to log, averaged over micro-batches and ranks."""
    cfg, device = s.cfg, s.device
    A = cfg.accumulate
    turn = generator_turn(it, cfg)
    samples, logs = [], []

    # The generator's update (Alg. 1 lines 4-10), on its turn; otherwise only its samples.
    for rng in training.micro_batches(s.streams, s.generator):
        x_data, text = s.videos(rng)  # line 4: videos and their prompts
        with utils.autocast(device, training=True):
            with torch.set_grad_enabled(turn):  # lines 5-7: each chunk noised to its own step
                x0, t_in = s.generator_input(s.generator, x_data, text, s.timesteps, rng, it)
            if turn:
                t = noise_level(x0, cfg, device)  # line 8
                # lines 9-10: noise x0 to t, Eq. 4's gradient from the real and the fake score
                loss, grad = cv.dmd_loss(x0, t, s.real, s.critic, text, s.uncond, cfg.real_guidance)
                log = {"dmd": training.backward(loss, 1 / A), "dmd_t": t[:, 0].mean().item()}
                logs.append(log | diagnostics(s, x0, t_in, grad, t, text))
        samples.append((x0.detach(), text))
    out = training.mean_logs(logs)
    if turn:
        out["gen_grad"] = training.apply_gradients(s.opt_g, s.generator.parameters(), cfg.grad_clip)

    # The critic's update (lines 11-14), every iteration: the denoising loss on G's samples.
    critic_losses = []
    for a, _ in enumerate(training.micro_batches(s.streams, s.critic)):
        x0, text = samples[a]
        with utils.autocast(device, training=True):
            loss = cv.critic_loss(s.critic, x0, noise_level(x0, cfg, device), text)  # a fresh t
            critic_losses.append(training.backward(loss, 1 / A))
    out["critic"] = sum(critic_losses) / A
    out["critic_grad"] = training.apply_gradients(s.opt_c, s.critic.parameters(), cfg.grad_clip)
    return out


def generator_inputs(cfg: cv.Config, device, seed: int):
    """Alg. 1 lines 5-7, picked once: (generator, videos, text, timesteps, rng, iteration) -> (G's
    clean estimate x0 (B, F, C, H, W), with grad where grad is on; the step t (B, F) each frame was
    made from, 0 for a chunk given clean)."""
    K = cfg.chunk_size
    if cfg.self_forcing and cfg.backward_simulation:
        raise cv.CausVidError(
            "self_forcing and backward_simulation are two ways to choose the generator's inputs; "
            "set one"
        )
    if cfg.first_chunk_step_indices and not cfg.self_forcing:
        raise cv.CausVidError(
            "first_chunk_step_indices trains through Self-Forcing's rollout (successors.py, 4); "
            "add --set self_forcing=true"
        )

    def noised_data(generator, x_data, text, timesteps, rng, it):  # Alg. 1: per-chunk noise
        return cv.generator_x0(generator, x_data.to(device), text, timesteps, K, cfg.clean_context)

    def backward_simulation(generator, x_data, text, timesteps, rng, it):  # DMD2 Sec. 4.5
        noise = torch.randn(x_data.shape, generator=rng).to(device)
        states = cv.backward_simulation(generator, noise, text, timesteps, rng)
        x_t, t = cv.chunkwise_states(states, timesteps, K, cfg.clean_context)
        return cv.predict_x0(generator, x_t, t, text), t

    if cfg.self_forcing:  # the student's own rollout, with grad through one step
        schedule = successors.chunk_schedule(cfg, device) if cfg.first_chunk_step_indices else None
        return successors.self_forcing_input(seed, device, schedule)
    if cfg.backward_simulation:
        return backward_simulation
    return noised_data


def preview(generator, world, emb, path: str):
    """A few streamed samples, to watch training progress (every rank samples: the sharded generator
    needs them all; rank 0 writes)."""
    make = utils.sampler(generator, "student", world.cfg, world.device)
    text = utils.stack_text(emb, world.preview_prompts, "cpu")
    video = utils.generate(make, text, world.cfg.num_frames, world, seed=0)[0]
    if training.rank() == 0:
        utils.write_video(path, video)
        tqdm.write(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    cfg, device, run = utils.resolve(args)
    device = training.init_distributed(device)
    world = utils.make_world(cfg, device, args.model_dir)
    utils.writable_dir(run, "--run-dir")
    make_x0 = generator_inputs(cfg, device, args.seed + 2)

    # Alg. 1 lines 1-2: G from stage 1 (run first on the toy world if missing), s_gen from s_data.
    ode_path = args.ode or os.path.join(run, "ode.safetensors")
    if not os.path.exists(ode_path):
        if args.ode or not (world.prompts or args.prompts):
            raise cv.CausVidError(
                f"stage-1 checkpoint {ode_path!r} not found; run train_ode.py first"
            )
        print(f"no stage-1 checkpoint at {ode_path}: running stage 1 (train_ode.py) first")
        train_ode.run(args, world, run)
    torch.manual_seed(args.seed)
    teacher_path = utils.teacher_path(args, run, world)
    print(f"generator init: {ode_path} | teacher and critic init: {teacher_path}")
    generator = utils.load_model(ode_path, causal=True, device=device, expect=cfg).train()
    # it samples its first chunk as this run trains it (successors.chunk_schedule)
    first = cfg.first_chunk_step_indices
    generator.cfg = dataclasses.replace(generator.cfg, first_chunk_step_indices=first)
    # the real score keeps the role it was trained in: bidirectional (CausVid), or a causal
    # diffusion model (Table 4's "causal teacher" ablation); the critic starts as a copy of it
    teacher = utils.load_model(teacher_path, device=device, expect=cfg).eval().requires_grad_(False)
    critic = copy.deepcopy(teacher).train().requires_grad_(True)
    teacher.to(world.frozen_dtype)  # Wan on a GPU: bf16 weights, no optimizer state to keep
    text_encoder = world.text_encoder(teacher_path)
    real = world.exact_teacher(text_encoder) if args.exact_teacher else teacher
    videos, pool = world.training_videos(training.ODEPairs(os.path.join(run, "ode_pairs")))
    emb = text_encoder.embed(list(pool) + [cfg.negative_prompt])
    text_encoder = world.saved_text_encoder(text_encoder)  # (Wan: UMT5's memory goes back)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    generator.gradient_checkpointing = cfg.gradient_checkpointing
    critic.gradient_checkpointing = cfg.gradient_checkpointing
    ema = training.ema(generator, cfg.generator_ema) if cfg.generator_ema else None
    generator = training.shard(generator)  # under torchrun: split over the ranks
    critic = training.shard(critic)
    if real is teacher:
        real = training.shard(real)  # the frozen teacher too

    def micro_batch(rng):
        x_data, prompts = videos(rng)
        return x_data, utils.stack_text(emb, prompts, device)

    betas = (cfg.dmd_beta1, 0.999)
    s = DMD(
        generator=generator,
        critic=critic,
        real=real,
        opt_g=training.adamw(generator.parameters(), cfg.lr_generator, device, betas),
        opt_c=training.adamw(critic.parameters(), cfg.lr_critic, device, betas),
        videos=micro_batch,
        generator_input=make_x0,
        uncond=emb[cfg.negative_prompt][None].to(device),
        timesteps=cv.student_timesteps(cfg).to(device),
        streams=training.Streams(args.seed + 2, cfg.accumulate),
        cfg=cfg,
        device=device,
    )
    init = training.local_parameters(generator)  # to log how far G moves
    logs = collections.defaultdict(list)
    total = cfg.critic_warmup + cfg.dmd_steps
    log_path = os.path.join(run, "dmd_log.jsonl")
    state = {
        "generator": generator,
        "critic": critic,
        "opt_g": s.opt_g,
        "opt_c": s.opt_c,
        "data": s.streams,
    }
    if ema is not None:
        state["ema"] = ema
    t0 = time.time()
    loop = training.TrainLoop(
        os.path.join(run, "dmd_state"),
        cfg,
        total,
        state,
        resume=args.resume,
        save_every=args.save_every,
        desc="DMD",
    )
    with loop:
        if training.rank() == 0 and loop.first_step == 0:
            open(log_path, "w").close()  # a fresh run's log (a resumed one appends)
        for it in loop:
            out = dmd_iteration(it, s)
            if ema is not None and it >= cfg.generator_ema_start:
                if generator_turn(it, cfg) or not ema.n_averaged:  # a copy at the start, then after
                    ema.update_parameters(generator)  # each generator update
            for k, v in out.items():
                logs[k].append(v)
            if (it + 1) % args.log_every == 0 or it + 1 == total:  # the means since the last line
                means = training.interval_means(logs)
                distance = training.distance_from(generator, init)
                training.log("dmd", it + 1, total, t0, log_path, LOGGED, **means, distance=distance)
            if args.checkpoint_every and (it + 1) % args.checkpoint_every == 0 and it + 1 < total:
                path = os.path.join(run, f"dmd_{it + 1:06d}.safetensors")
                config = dataclasses.asdict(cfg)
                training.save_model(
                    path, generator, text_encoder, stage="dmd", steps=it + 1, run_config=config
                )
            if world.preview_prompts and ((it + 1) % args.sample_every == 0 or it + 1 == total):
                preview(generator, world, emb, os.path.join(run, f"dmd_samples_{it + 1:06d}.gif"))
        if ema is not None and ema.n_averaged:  # (a run shorter than generator_ema_start keeps G)
            generator.load_state_dict(ema.module.state_dict())
        path = os.path.join(run, "dmd.safetensors")
        # the generator's config is stage 1's; the settings this run trained with are run_config
        training.save_model(
            path,
            generator.eval(),
            text_encoder,
            stage="dmd",
            steps=cfg.dmd_steps,
            run_config=dataclasses.asdict(cfg),
            exact_teacher=args.exact_teacher,
            seconds_per_iteration=(time.time() - t0) / max(1, total - loop.first_step),
        )
        print(f"wrote {path}")
    if args.scorecard and world.score is not None and training.rank() == 0:
        teacher = utils.load_model(teacher_path, device=device)  # in the role it was trained in
        models = {
            "teacher": (teacher, "causal" if teacher.causal else "teacher"),
            "ODE student": (utils.load_model(ode_path, causal=True, device=device), "student"),
            "DMD student": (utils.load_model(path, causal=True, device=device), "student"),
        }
        card = os.path.join(run, "scorecard.gif")
        utils.scorecard(world, models, text_encoder, card, seed=args.seed)


if __name__ == "__main__":
    utils.run_cli(main)
