"""Stage 2 of CausVid: asymmetric distribution matching distillation (Sec. 3.2, 4.2; Alg. 1; Eq. 4).

The block-causal generator G (from stage 1) learns to make videos whose noised versions the frozen
bidirectional teacher (s_data, the "real" score, with CFG) and a critic trained online on G's own
samples (s_gen, the "fake" score, initialised from the teacher) disagree about as little as possible.
Generator inputs are data clips noised per chunk to random steps of T = {0, t1..tQ} (Alg. 1 lines
4-7); or, with --set backward_simulation=true, the states of the student's own streamed rollout
(DMD2 Sec. 4.5). The critic takes critic_updates_per_generator steps per generator step (DMD2's two
time-scale update rule). With --tiny and no stage-1 checkpoint, stage 1 (train_ode.py) runs first,
so this one command trains everything.

Writes <run>/dmd.safetensors, <run>/dmd_log.jsonl (each log line's means, training.dmd_diagnostics's
included) and on the toy world <run>/dmd_samples_<iteration>.gif every --sample-every.
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
import toy_world as toy
import train_ode
import training
import utils


LOGGED = ("dmd", "critic", "critic_fm", "teacher_fm", "distance", "gen_grad", "critic_grad")  # the log line; all: dmd_log.jsonl


def parse_args(argv=None):
    p = utils.add_training_args(utils.add_common_args(argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)))
    p.add_argument("--steps", "--dmd-steps", dest="dmd_steps", type=int, help="DMD iterations, each a critic "
                   "update; the generator steps every critic_updates_per_generator-th (default: the preset's)")
    p.add_argument("--ode", help="the generator's initialisation: the stage-1 student (default: <run>/ode.safetensors); "
                                 "a teacher checkpoint here is 'DMD without ODE init'")
    p.add_argument("--ode-steps", type=int, help="stage-1 regression steps, if stage 1 runs first (default: the preset's)")
    p.add_argument("--sample-every", type=int, default=500, help="iterations between sample GIFs (default: 500)")
    p.add_argument("--checkpoint-every", type=int, help="also keep the generator (not its EMA) every N iterations, "
                   "critic warm-up included, as <run>/dmd_<iteration>.safetensors (a length curve)")
    p.set_defaults(log_every=50)
    return p.parse_args(argv)


def generator_output(generator, x_data, text, timesteps, cfg: cv.Config, device, g, step: int):
    """Alg. 1 lines 4-7: the generator's clean estimate of this iteration's videos (with grad when
    grad is on): noised data chunks (Alg. 1), the states of its own rollout (backward simulation), or
    the rollout itself (Self-Forcing, through student step `step`). -> (x0 (B, F, C, H, W), the step
    t (B, F) each frame was made from; 0 for a chunk given clean)."""
    K = cfg.chunk_size
    if cfg.self_forcing:  # the student's own KV-cached rollout from noise, with grad through one step
        x0 = cv.self_forcing_rollout(generator, torch.randn(x_data.shape, generator=g).to(device), text, timesteps, g,
                                     step)
        return x0, timesteps[step].expand(x0.shape[:2])
    if cfg.backward_simulation:  # DMD2 Sec. 4.5: the inputs come from the student's own rollout
        states = cv.backward_simulation(generator, torch.randn(x_data.shape, generator=g).to(device), text, timesteps, g)
        x_t, t = cv.chunkwise_states(states, timesteps, K, cfg.clean_context)
        return cv.predict_x0(generator, x_t, t, text), t
    return cv.generator_x0(generator, x_data.to(device), text, timesteps, K, cfg.clean_context)  # lines 5-7


def dmd_step(it: int, generator, critic, real, opt_g, opt_c, micro_batch, uncond, timesteps, cfg: cv.Config, device,
             streams: training.Streams) -> dict:
    """One iteration of Alg. 1 (lines 4-14) under DMD2's two time-scale rule -- the critic learns every
    iteration, the generator every critic_updates_per_generator-th after the first critic_warmup (during
    which only the critic learns, on the stage-1 student's samples) -- over this rank's cfg.accumulate
    micro-batches, micro_batch(generator) -> (videos, text). -> what to log, averaged over all of them."""
    A, samples, logs = cfg.accumulate, [], []
    generator_turn = it >= cfg.critic_warmup and (it - cfg.critic_warmup) % cfg.critic_updates_per_generator == 0
    dmd_t = lambda x: cv.dmd_timesteps(len(x), x.shape[1], cfg.dmd_shift or cfg.shift, cfg.dmd_t_min, cfg.dmd_t_max, device)
    step = int(torch.randint(len(timesteps), (1,), generator=torch.Generator().manual_seed(streams.seed * 7919 + it)))
    for a in range(A):  # the same Self-Forcing step on every rank: they run the same forwards
        with streams.use(a) as g:
            x_data, text = micro_batch(g)  # line 4
            with utils.autocast(device, training=True), torch.set_grad_enabled(generator_turn):
                x0, t_in = generator_output(generator, x_data, text, timesteps, cfg, device, g, step)
            if generator_turn:  # lines 8-10
                with utils.autocast(device, training=True), training.gradient_sync(generator, a + 1 == A):
                    t = dmd_t(x0)
                    loss_g, grad = cv.dmd_loss(x0, t, real, critic, text, uncond, cfg.real_guidance)
                    logs.append({"dmd": training.backward(loss_g, 1 / A), "dmd_t": t[:, 0].mean().item(),
                                 **training.dmd_diagnostics(x0, t_in, grad, t, real, critic, text, timesteps, cfg.chunk_size)})
        samples.append((x0.detach(), text))
    out = {k: training.nanmean_over_ranks([log[k] for log in logs]) for k in (logs[0] if logs else ())}
    if generator_turn:
        out["gen_grad"] = training.apply_gradients(opt_g, generator.parameters(), cfg.grad_clip)
    critic_losses = []
    for a, (x0, text) in enumerate(samples):  # lines 11-14
        with streams.use(a), utils.autocast(device, training=True), training.gradient_sync(critic, a + 1 == A):
            critic_losses.append(training.backward(cv.critic_loss(critic, x0, dmd_t(x0), text), 1 / A))
    return {**out, "critic": sum(critic_losses) / A,
            "critic_grad": training.apply_gradients(opt_c, critic.parameters(), cfg.grad_clip)}


def dataset(cfg: cv.Config, run: str):
    """Alg. 1 line 4's videos: the toy renderer; on Wan the teacher's ODE end points (stage 1's pairs)
    stand in for a video dataset. -> (draw(generator) -> (x0, prompts), every prompt it can draw)."""
    if cfg.name == "tiny":
        return lambda g: toy.toy_batch(cfg.batch_size, cfg.num_frames, g), toy.PROMPTS
    pairs = training.ODEPairs(os.path.join(run, "ode_pairs"))
    if not len(pairs):
        raise cv.CausVidError(f"no ODE pairs in {os.path.join(run, 'ode_pairs')!r}; run train_ode.py first")

    def draw(g):  # reads only the end points it draws
        i = torch.randint(0, len(pairs), (cfg.batch_size,), generator=g)
        return pairs.get(i, state=-1), [pairs.prompts[j] for j in i]
    return draw, pairs.prompts


def main(argv=None):
    args = parse_args(argv)
    cfg, device, run = utils.resolve(args)
    device = training.init_distributed(device)
    utils.writable_dir(run, "--run-dir")
    ode_path = args.ode or os.path.join(run, "ode.safetensors")
    if not os.path.exists(ode_path):
        if args.ode or cfg.name != "tiny":
            raise cv.CausVidError(f"stage-1 checkpoint {ode_path!r} not found; run train_ode.py first")
        print(f"no stage-1 checkpoint at {ode_path}: running stage 1 (train_ode.py) first")
        train_ode.run(args, cfg, device, run)
    if cfg.self_forcing and cfg.backward_simulation:
        raise cv.CausVidError("self_forcing and backward_simulation are two ways to choose the generator's inputs; set one")
    torch.manual_seed(args.seed)
    teacher_path = utils.teacher_path(args, run, cfg)
    print(f"generator init: {ode_path} | teacher and critic init: {teacher_path}")
    generator = utils.load_model(ode_path, causal=True, device=device, expect=cfg).train()  # Alg. 1 line 1
    # the real score keeps the role it was trained in: bidirectional (CausVid), or a causal diffusion
    # model (Table 4's "causal teacher" ablation); the critic starts as a copy of it
    teacher = utils.load_model(teacher_path, device=device, expect=cfg).eval().requires_grad_(False)
    critic = copy.deepcopy(teacher).train().requires_grad_(True)  # Alg. 1 line 2: s_gen starts as s_data
    if device.type == "cuda" and cfg.name != "tiny":
        teacher.to(torch.bfloat16)  # frozen: bf16 weights suffice, and need no optimizer state
    text_encoder = utils.text_encoder_for(teacher_path, cfg, device)
    real = utils.real_score(teacher, text_encoder, cfg, args.exact_teacher)  # --exact-teacher: the toy world's own
    data, pool = dataset(cfg, run)
    emb = utils.embed_prompts(text_encoder, list(pool) + [cfg.negative_prompt])
    uncond = emb[cfg.negative_prompt][None].to(device)
    if cfg.name != "tiny":  # UMT5-XXL's memory goes back before training starts
        text_encoder = None
        torch.cuda.empty_cache() if device.type == "cuda" else None
    generator.gradient_checkpointing = critic.gradient_checkpointing = cfg.gradient_checkpointing
    ema = training.ema(generator, cfg.generator_ema) if cfg.generator_ema else None  # Self-Forcing's recipe
    generator, critic = training.shard(generator), training.shard(critic)  # under torchrun: split over the ranks
    real = training.shard(real) if real is teacher else real  # the frozen teacher too

    opt_g, opt_c = (training.adamw(model.parameters(), lr, device, (cfg.dmd_beta1, 0.999))
                    for model, lr in ((generator, cfg.lr_generator), (critic, cfg.lr_critic)))
    timesteps, t0 = cv.student_timesteps(cfg).to(device), time.time()
    streams = training.Streams(args.seed + 2, cfg.accumulate)
    init, logs = training.local_parameters(generator), collections.defaultdict(list)  # init: to log how far G moves
    total, log_path = cfg.critic_warmup + cfg.dmd_steps, os.path.join(run, "dmd_log.jsonl")

    def micro_batch(g):
        x_data, prompts = data(g)
        return x_data, utils.stack_text(emb, prompts, device)

    state = {"generator": generator, "critic": critic, "opt_g": opt_g, "opt_c": opt_c, "data": streams,
             **({"ema": ema} if ema is not None else {})}
    with training.TrainLoop(os.path.join(run, "dmd_state"), cfg, total, state, args.resume,
                         args.save_every, "DMD") as loop:
        if training.rank() == 0 and loop.first_step == 0:
            open(log_path, "w").close()  # a fresh run's log (a resumed one appends)
        for it in loop:
            out = dmd_step(it, generator, critic, real, opt_g, opt_c, micro_batch, uncond, timesteps, cfg, device, streams)
            if ema is not None and it >= cfg.generator_ema_start and ("gen_grad" in out or not ema.n_averaged):
                ema.update_parameters(generator)  # a copy at generator_ema_start, then after each generator update
            for k, v in out.items():
                logs[k].append(v)
            if (it + 1) % args.log_every == 0 or it + 1 == total:  # the means since the last log line
                training.log("dmd", it + 1, total, t0, log_path, LOGGED, **training.interval_means(logs),
                          distance=training.distance_from(generator, init))
            if args.checkpoint_every and (it + 1) % args.checkpoint_every == 0 and it + 1 < total:
                training.save_model(os.path.join(run, f"dmd_{it + 1:06d}.safetensors"), generator, text_encoder,
                                 stage="dmd", steps=it + 1, run_config=dataclasses.asdict(cfg))
            if cfg.name == "tiny" and ((it + 1) % args.sample_every == 0 or it + 1 == total):
                path = os.path.join(run, f"dmd_samples_{it + 1:06d}.gif")
                prompts = toy.PROMPTS[::6]  # a few streamed samples, to watch training progress
                video = utils.generate(generator, "student", utils.stack_text(emb, prompts, "cpu"), cfg,
                                       cfg.num_frames, 0, device)[0]
                if training.rank() == 0:  # (every rank sampled: the sharded generator needs them all)
                    utils.write_video(path, toy.to_uint8(video))
                    tqdm.write(f"wrote {path}")
        if ema is not None and ema.n_averaged:  # (a run shorter than generator_ema_start keeps its weights)
            generator.load_state_dict(ema.module.state_dict())
        path = os.path.join(run, "dmd.safetensors")
        # the generator's config is stage 1's; the settings this run trained with go in as run_config
        training.save_model(path, generator.eval(), text_encoder, stage="dmd", steps=cfg.dmd_steps,
                         run_config=dataclasses.asdict(cfg), exact_teacher=args.exact_teacher,
                         seconds_per_iteration=(time.time() - t0) / max(1, total - loop.first_step))
        print(f"wrote {path}")


if __name__ == "__main__":
    utils.run_cli(main)
