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
  4. Recipes: a successor's settings as one flag (--recipe).
"""

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
    generator: cv.DiT, noise, text, timesteps, rng=None, step=None
) -> torch.Tensor:
    """DMD's generator input is the student's own Alg. 2 rollout from noise, KV cache included. One
    student step s is drawn per call for all chunks: each chunk runs steps 0..s-1 without gradient
    and step s with it, and its x0 there is its output, cached at t = 0 without gradient.
    -> the clip (B, F, C, H, W)."""
    if step is None:
        step = int(torch.randint(len(timesteps), (1,), generator=rng))
    cache = RolloutKVCache()
    chunks = []
    for x in noise.split(generator.cfg.chunk_size, dim=1):
        if step:  # steps 0 .. s-1, then the re-noising to step s, without gradient
            with torch.no_grad():
                x0, _ = cv.denoise_chunk(generator, x, text, timesteps[:step], cache, rng)
                x = cv.renoise(x0, float(timesteps[step]), rng)
        t = torch.full(x.shape[:2], float(timesteps[step]), device=x.device)
        chunks.append(cv.predict_x0(generator, x, t, text, cache=cache))
        cv.fill_cache(generator, cache, chunks[-1].detach(), text)  # the chunks after it see it
    return torch.cat(chunks, 1)


def rollout_step(seed: int, iteration: int, num_steps: int) -> int:
    """The student step an iteration's rollout trains, the same on every rank and micro-batch (they
    run the same forwards), drawn from its own stream: the data's streams never see it."""
    g = torch.Generator().manual_seed(seed * 7919 + iteration)
    return int(torch.randint(num_steps, (1,), generator=g))


def self_forcing_input(seed: int, device):
    """train_dmd.py's generator input under Self-Forcing (in place of Alg. 1 lines 4-7):
    (generator, videos, text, timesteps, rng, iteration) -> (x0, the step each frame was made from).
    The data videos give only the shape: the rollout starts from noise."""

    def x0_of(generator, x_data, text, timesteps, rng, iteration):
        step = rollout_step(seed, iteration, len(timesteps))
        noise = torch.randn(x_data.shape, generator=rng).to(device)
        x0 = self_forcing_rollout(generator, noise, text, timesteps, rng, step)
        return x0, timesteps[step].expand(x0.shape[:2])

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
    weights = 1 / torch.arange(1.0, x0.shape[1] // K + 1)
    chunk = int(torch.multinomial(weights, 1, generator=rng))
    return teacher_forcing_loss(model, x0, t, text, chunk, K)


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
# 4. Recipes: a successor's settings as one flag (over the preset, under the flags and --set)
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
    }
}
