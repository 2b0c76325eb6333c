"""What came after CausVid, each a unit beside the method: causvid.py carries none of their ifs,
and a script picks their pieces once, where it sets up (docs/successors.md measures them on the
toy world).

  1. Self-Forcing (Huang et al., arXiv 2506.08009; guandeh17/Self-Forcing): DMD on the student's
     own KV-cached rollout from noise, as inference runs it, instead of on noised data.
  2. Causal Forcing (Zhu et al., arXiv 2602.02214; thu-ml/Causal-Forcing): a causal diffusion
     teacher, trained by teacher forcing, whose own chunk-by-chunk sampler
     (causvid.sample_ode_causal) makes the ODE pairs -- so no chunk's target depends on the noise
     of the chunks after it.
  3. A rolling KV cache with an attention sink (StreamingLLM; Self-Forcing's and LongLive's long
     videos): a bounded cache that never re-encodes.
  4. The first chunk, made from noise with no context (the prompt alone sets its motion): more
     steps for it (Diagonal Distillation, arXiv 2603.09488; Causal Forcing++'s first-chunk steps),
     or, as the bound on what it can gain, the causal teacher's own many-step sampler.
  5. Causal Forcing++ (arXiv 2605.15141; thu-ml/Causal-Forcing): stage 1 by causal consistency
     distillation of the causal teacher on data, in place of ODE pairs.
  6. Recipes: a successor's settings as one flag (--recipe).
"""

from dataclasses import replace

import torch
import torch.nn.functional as F

import causvid as cv

# ------------------------------------------------------------------------------------------------
# 1. Self-Forcing: DMD on the student's own rollout
# ------------------------------------------------------------------------------------------------


class RolloutKVCache(cv.KVCache):
    """The cache Self-Forcing trains through. Without gradient it is the KV cache. A forward with
    gradient attends over the cache and its own keys, concatenated, and writes nothing: its keys
    keep their graph, and a checkpointed block recomputed in backward finds the cache as it was."""

    def attend_to(self, layer: int, k, v, rotation):
        if not k.requires_grad:
            return super().attend_to(layer, k, v, rotation)
        start = rotation.shape[0] - k.shape[1]
        k = cv.apply_rope(k, rotation[start:])
        if layer not in self.k:
            return k, v
        keys = torch.cat([self.k[layer][:, :start], k], 1)
        values = torch.cat([self.v[layer][:, :start], v], 1)
        return keys, values


def self_forcing_rollout(
    generator: cv.DiT, noise, text, timesteps: cv.Steps, rng=None, step=None
) -> torch.Tensor:
    """DMD's generator input is the student's own Alg. 2 rollout from noise, KV cache included. One
    student step s is drawn per call for all chunks (draw_steps: a first chunk with steps of its
    own, section 4, draws its own; or given: an int, or one per chunk): each chunk runs steps
    0..s-1 without gradient and step s with it, and its x0 there is its output, cached at t = 0
    without gradient.
    -> the clip (B, F, C, H, W)."""
    if step is None:
        step = draw_steps(rng, timesteps, noise.shape[1] // generator.cfg.chunk_size)
    cache = RolloutKVCache()
    chunks = []
    for c, x in enumerate(noise.split(generator.cfg.chunk_size, dim=1)):
        ts = cv.chunk_timesteps(timesteps, c)
        s = step[c] if isinstance(step, (list, tuple)) else step
        if s:  # steps 0 .. s-1, then the re-noising to step s, without gradient
            with torch.no_grad():
                x0, _ = cv.denoise_chunk(generator, x, text, ts[:s], cache, rng)
                x = cv.renoise(x0, float(ts[s]), rng)
        t = torch.full(x.shape[:2], float(ts[s]), device=x.device)
        chunks.append(cv.predict_x0(generator, x, t, text, cache=cache))
        cv.fill_cache(generator, cache, chunks[-1].detach(), text)  # the chunks after it see it
    return torch.cat(chunks, 1)


def draw_steps(rng, timesteps: cv.Steps, num_chunks: int) -> list[int]:
    """The student step each chunk of a rollout trains: one draw for all chunks; where the first
    chunk has a step list of another length (section 4), a second draw for it, from its own."""
    first, base = (len(cv.chunk_timesteps(timesteps, c)) for c in (0, num_chunks - 1))
    steps = [int(torch.randint(base, (1,), generator=rng))] * num_chunks
    if first != base:
        steps[0] = int(torch.randint(first, (1,), generator=rng))
    return steps


def rollout_steps(seed: int, iteration: int, timesteps: cv.Steps, num_chunks: int) -> list[int]:
    """draw_steps for an iteration, the same on every rank and micro-batch (they run the same
    forwards), from its own stream (the data's streams never see it)."""
    return draw_steps(torch.Generator().manual_seed(seed * 7919 + iteration), timesteps, num_chunks)


def self_forcing_input(seed: int, device, schedule: cv.Steps | None = None):
    """train_dmd.py's generator input under Self-Forcing (in place of Alg. 1 lines 4-7):
    (generator, videos, text, timesteps, rng, iteration) -> (x0, the step each frame was made from).
    The data videos give only the shape: the rollout starts from noise. schedule: each chunk's
    steps where the first chunk has its own (chunk_schedule), in place of `timesteps`."""

    def x0_of(generator, x_data, text, timesteps, rng, iteration):
        timesteps = timesteps if schedule is None else schedule
        K = generator.cfg.chunk_size
        steps = rollout_steps(seed, iteration, timesteps, x_data.shape[1] // K)
        noise = torch.randn(x_data.shape, generator=rng).to(device)
        x0 = self_forcing_rollout(generator, noise, text, timesteps, rng, steps)
        made_at = [cv.chunk_timesteps(timesteps, c)[s] for c, s in enumerate(steps)]
        t = torch.stack(made_at).to(x0.device).repeat_interleave(K)
        return x0, t.expand(x0.shape[:2])

    return x0_of


# ------------------------------------------------------------------------------------------------
# 2. Causal Forcing: a causal teacher, trained by teacher forcing, makes the ODE pairs
# ------------------------------------------------------------------------------------------------


def teacher_forcing_loss(
    model, x0: torch.Tensor, t: torch.Tensor, text, chunk: int, chunk_size: int
):
    """Eq. 2 for a block-causal model on chunk `chunk` of x0 (B, F, C, H, W) at t (B,), after the
    clean chunks before it at t = 0 -- what its sampler's KV cache holds (sample_ode_causal) -- with
    nothing after it. So every chunk's ODE target is set by its own noise and its past alone.
    (Causal Forcing packs [clean clip; noisy clip] in one masked sequence, every chunk at its own t,
    per step.)"""
    x0 = x0[:, : (chunk + 1) * chunk_size]  # the chunks after `chunk` never enter
    t_past = t.new_zeros(len(t), chunk * chunk_size)
    t_all = torch.cat([t_past, t[:, None].expand(-1, chunk_size)], 1)
    eps = torch.randn_like(x0)
    v = model(cv.add_noise(x0, eps, t_all), t_all, text)[:, -chunk_size:]
    return F.mse_loss(v.float(), (eps - x0)[:, -chunk_size:].float())


def teacher_forcing_step(
    model: cv.DiT, x0: torch.Tensor, t: torch.Tensor, text, rng
) -> torch.Tensor:
    """One training step's loss for the causal teacher (t (B,) one per clip): chunk c is drawn with
    probability proportional to 1 / (c + 1). Chunk c costs c + 1 chunks' compute, so every chunk
    gets the same share of it, and chunk 0 -- no context, the prompt alone sets its motion -- about
    half of the steps."""
    K = model.cfg.chunk_size
    return teacher_forcing_loss(model, x0, t, text, draw_chunk(x0.shape[1] // K, rng), K)


def draw_chunk(num_chunks: int, rng) -> int:
    """A chunk c drawn with probability proportional to 1 / (c + 1): its forward over its past
    costs c + 1 chunks, so each chunk gets the same share of the compute."""
    weights = 1 / torch.arange(1.0, num_chunks + 1)
    return int(torch.multinomial(weights, 1, generator=rng))


# ------------------------------------------------------------------------------------------------
# 3. A rolling KV cache with an attention sink
# ------------------------------------------------------------------------------------------------


class RollingKVCache(cv.KVCache):
    """A bounded cache for unbounded streams with no re-encoding (the attention sink of
    StreamingLLM; Self-Forcing's sink_size / local_attn_size, LongLive): the first `sink` frames
    stay, then the most recent ones, `window` frames in all with the chunk being made; the middle
    is evicted.

    Keys are kept before RoPE and rotated when read: the sink at positions 0.., the recent frames
    `gap` positions after it, gap = the evicted frames up to `max_gap` (0: contiguous, the sink just
    before the recent frames, no position past the window; -1: all of them, Self-Forcing's absolute
    positions). With no sink the two agree: RoPE sees only distances.
    """

    def __init__(self, sink: int, window: int, chunk_size: int, max_gap: int = 0):
        if not 0 <= sink <= window - 2 * chunk_size:
            raise ValueError(
                f"sink {sink} must leave room in the window {window} for two chunks of {chunk_size}"
            )
        super().__init__()
        self.sink = sink
        self.window = window
        self.chunk_size = chunk_size
        self.max_gap = max_gap
        self.gap = 0  # frames of evicted time between the sink and the recent frames
        self.N = 0  # tokens per frame, known at the first eviction

    @property
    def next_position(self) -> int:
        return self.num_frames + self.gap

    def attend_to(self, layer: int, k, v, rotation):
        keys, values = self.write(layer, k, v)  # before RoPE
        return cv.apply_rope(keys, self.visible(rotation)), values

    def visible(self, rotation: torch.Tensor) -> torch.Tensor:
        """The rows of `rotation` (the cache's positions and the chunk's, the evicted gap included)
        at which the cached frames and the chunk sit: the gap's rows dropped."""
        a = self.sink * self.N
        b = (self.sink + self.gap) * self.N
        if b > a:
            return torch.cat([rotation[:a], rotation[b:]])
        return rotation

    def commit(self, frames: int, tokens: int):
        super().commit(frames, tokens)
        evict = self.num_frames - (self.window - self.chunk_size)  # leave room for the next chunk
        if evict <= 0:
            return
        N = self.N = tokens // frames
        a = self.sink * N  # drop tokens a..b, the oldest after the sink; the rest move up
        b = (self.sink + evict) * N
        n = self.num_tokens
        for buffer in [*self.k.values(), *self.v.values()]:
            buffer[:, a : n - (b - a)] = buffer[:, b:n].clone()
        self.num_frames -= evict
        self.num_tokens = n - (b - a)
        if self.max_gap < 0:
            self.gap += evict
        else:
            self.gap = min(self.gap + evict, self.max_gap)


def rolling_generate(
    model: cv.DiT, noise, text, timesteps, generator=None, context=None, *, window, sink, sink_gap=0
):
    """Alg. 2 (causvid.stream_generate) over a RollingKVCache of `window` frames that keeps the
    first `sink`: in place of the official re-encoding window (causvid.windowed_generate)."""
    K = model.cfg.chunk_size
    if window % K or window < 2 * K:
        raise ValueError(f"window {window} must be whole chunks of {K}, at least 2")
    cache = RollingKVCache(sink, window, K, sink_gap)
    return cv.stream_generate(model, noise, text, timesteps, generator, context, cache)


# ------------------------------------------------------------------------------------------------
# 4. The first chunk: more steps for it, or the causal teacher's own sampler (the bound)
# ------------------------------------------------------------------------------------------------

# Chunk 0 is made from noise with no context: the prompt alone must set its motion, and that is
# where the students fall short of their teachers (docs/experiments.md). Diagonal Distillation
# (Sphere-AI-Lab/diagdistill) gives the early chunks more steps than the later ones, in training
# (the rollout, section 1) and sampling; Causal Forcing++ samples a 2-step student with a 4-step
# first chunk (denoising_step_list_first_chunk). Here chunk 0 may have steps of its own,
# first_chunk_step_indices (by index into the teacher's schedule, as student_step_indices), and the
# cache after it holds what CausVid's does: the clean chunk re-run at t = 0 (Alg. 2 lines 10-12).


def chunk_schedule(cfg: cv.Config, device=None, below: float | None = None) -> cv.Steps:
    """Each chunk's steps (causvid.stream_generate's `timesteps`): the student's, or, where
    first_chunk_step_indices is set, chunk 0's own then the student's. below: only the steps at or
    under this t (video-to-video starts part-way)."""

    def steps(indices):
        ts = cv.student_timesteps(replace(cfg, student_step_indices=indices)).to(device)
        return ts if below is None else ts[ts <= below + 1e-3]

    base = steps(cfg.student_step_indices)
    if not cfg.first_chunk_step_indices:
        return base
    idx = cfg.first_chunk_step_indices
    if idx[0] != 0 or list(idx) != sorted(set(idx)) or idx[-1] >= cfg.teacher_steps:
        raise cv.CausVidError(
            f"first_chunk_step_indices={','.join(map(str, idx))}: chunk 0's steps must start at 0 "
            f"(pure noise) and increase, each below teacher_steps={cfg.teacher_steps}; "
            "e.g. 0,3,6,9,12,15,18,21"
        )
    first = steps(idx)
    return lambda c: first if c == 0 else base


def teacher_first_chunk(teacher: cv.DiT, uncond, guidance: float, steps: int, shift: float):
    """The bound on what a better first chunk can win: chunk 0 made by a causal diffusion model's
    own sampler (Euler + CFG over its cache, causvid.sample_ode_causal), the shipped causal teacher
    (weights/) on the toy world. -> first(noise chunk, text, context) -> the clean chunk."""

    def first(x, text, context=None):
        options = dict(guidance=guidance, steps=steps, shift=shift, context=context)
        return cv.sample_ode_causal(teacher, x, text, uncond, **options)[0]

    return first


@torch.no_grad()
def first_chunk_generate(
    model: cv.DiT, noise, text, timesteps: cv.Steps, generator=None, context=None, *, first, then
):
    """Alg. 2 with chunk 0 made by `first` (teacher_first_chunk), then the stream `then`
    (causvid.stream_generate, or a windowed one) of the student over it as context: the student
    caches it at t = 0 as it caches its own chunks. The chunks after it keep their indices (their
    noise, text and steps are those of chunks 1, 2, ...)."""
    chunks = cv.as_chunks(noise, model.cfg.chunk_size)
    per_chunk = not isinstance(text, torch.Tensor)
    x0 = first(next(chunks), text[0] if per_chunk else text, context)
    yield x0
    past = x0 if context is None else torch.cat([context, x0], 1)
    rest = text[1:] if per_chunk else text

    def later_steps(c):
        return cv.chunk_timesteps(timesteps, c + 1)

    def later_rng(c):
        return cv.chunk_generator(generator, c + 1)

    yield from then(model, chunks, rest, later_steps, later_rng, past)


# ------------------------------------------------------------------------------------------------
# 5. Causal Forcing++: stage 1 by causal consistency distillation
# ------------------------------------------------------------------------------------------------


def consistency_grid(cfg: cv.Config) -> torch.Tensor:
    """The t's consistency distillation steps between: the teacher's shifted sampling schedule at
    consistency_grid steps (Causal Forcing++: 48, where the 4-step student's t are every 12th)."""
    return cv.sampling_schedule(cfg.consistency_grid, cfg.shift).float()


def consistency_loss(
    student, target, teacher, x0, text, uncond, guidance: float, t, t_next, chunk: int, K: int
):
    """Causal Forcing++'s consistency distillation on chunk `chunk` of data clips x0
    (B, F, C, H, W), after its clean past at t = 0 (teacher forcing: what the cache holds when the
    chunk is made): noised to t (B,), the frozen causal teacher's one Euler step with CFG takes it
    to the next grid point t_next (B,); the student's x0 at t regresses onto the target network's
    (an EMA of the student, no gradient) x0 at t_next. In x0, with no boundary scaling (their
    naive_consistency.py)."""
    past, x = x0[:, : chunk * K], x0[:, chunk * K : (chunk + 1) * K]
    t, t_next = t[:, None].expand(-1, K), t_next[:, None].expand(-1, K)

    def after_past(net):  # a chunk's velocity after the clean past (doubled in CFG's batch)
        def velocity(y, s, c):
            return cv.velocity_after(net, torch.cat([past] * (len(y) // len(past))), y, s, c)

        return velocity

    x_t = cv.add_noise(x, torch.randn_like(x), t)
    with torch.no_grad():
        v = cv.guided_velocity(after_past(teacher), x_t, t, text, uncond, guidance)
        x0_hat = cv.velocity_to_x0(x_t, v, t)  # the Euler step of the flow: x0_hat, and
        x_next = cv.add_noise(x0_hat, x0_hat + v, t_next)  # eps_hat = x0_hat + v, at t_next
        goal = cv.velocity_to_x0(x_next, after_past(target)(x_next, t_next, text), t_next)
    pred = cv.velocity_to_x0(x_t, after_past(student)(x_t, t, text), t)
    return F.mse_loss(pred.float(), goal.float())


def consistency_step(student, target, teacher, x0, text, uncond, cfg: cv.Config, rng):
    """One step's loss: a chunk drawn with probability proportional to 1 / (c + 1) (as the causal
    teacher was trained), a grid point n per clip, uniform over all but the last."""
    grid = consistency_grid(cfg).to(x0.device)
    n = torch.randint(len(grid) - 1, (len(x0),), generator=rng).to(x0.device)
    chunk = draw_chunk(x0.shape[1] // cfg.chunk_size, rng)
    guidance = cfg.teacher_guidance
    return consistency_loss(
        student,
        target,
        teacher,
        x0,
        text,
        uncond,
        guidance,
        grid[n],
        grid[n + 1],
        chunk,
        cfg.chunk_size,
    )


# ------------------------------------------------------------------------------------------------
# 6. Recipes: a successor's settings as one flag (over the preset, under the flags and --set)
# ------------------------------------------------------------------------------------------------

# Causal Forcing's: causal ODE init, then Self-Forcing's DMD with their Adam (beta1 0), rates and
# EMA (configs/causal_forcing_dmd_chunkwise.yaml; shift, steps and CFG stay the preset's). On the
# toy world at rates x 4 for twice the iterations, the most accurate (docs/successors.md).
CAUSAL_FORCING = dict(
    causal_ode_init=True,
    self_forcing=True,
    dmd_beta1=0.0,
    generator_ema=0.99,
    generator_ema_start=200,
)
RECIPES = {
    "causal-forcing": {
        # (stage 1 as the recipe was measured: 600 steps at 1e-4 on pairs of every teacher step;
        # then in fp32, now in bf16 where the CPU has it natively, as all training is)
        "tiny": dict(
            CAUSAL_FORCING,
            ode_pair_stride=1,
            ode_steps=600,
            lr_ode=1e-4,
            lr_generator=2e-4,
            lr_critic=4e-5,
            dmd_steps=800,
        ),
        "wan2.1-t2v-1.3b": dict(CAUSAL_FORCING, lr_generator=2e-6, lr_critic=4e-7),
    },
    # The README's best student with Diagonal Distillation's lever (docs/successors.md, "The first
    # chunk"): the causal ODE init at lr_ode 3e-5, the rollout at CausVid's DMD settings for 736
    # iterations, and chunk 0 in 8 steps against the others' 4, trained so and sampled so.
    # Measured on the toy world only: no Wan entry.
    "diagonal": {
        "tiny": dict(
            causal_ode_init=True,
            self_forcing=True,
            ode_pair_stride=1,
            ode_steps=600,
            lr_ode=3e-5,
            dmd_steps=736,
            first_chunk_step_indices=(0, 3, 6, 9, 12, 15, 18, 21),
        ),
    },
}
