"""CausVid in one file: a block-causal video DiT distilled from a bidirectional teacher.

Paper: Yin, Zhang, Zhang, Freeman, Durand, Shechtman, Huang. "From Slow Bidirectional to Fast
Autoregressive Video Diffusion Models", CVPR 2025, arXiv 2412.07772.

The method, in the order this file defines it:
  1. config and presets
  2. flow matching (Sec. 3.1)
  3. the DiT's building blocks, 4. the block-causal mask (Sec. 4.1, Eq. 5) and the KV cache,
  5. the DiT itself (Wan2.1's architecture, so the official weights load)
  6. streaming generation with the KV cache (Sec. 4.4, Alg. 2), and the paper's baselines
  7. ODE initialisation (Sec. 4.3, Eq. 6)
  8. asymmetric distribution matching distillation (Sec. 3.2, 4.2, Eq. 4, Alg. 1)
What came after CausVid (Self-Forcing, Causal Forcing, rolling caches) is in successors.py.

Shape letters: B batch, F frames, C channels, H height, W width (of the latent frame),
N tokens per frame, S tokens in a sequence, L text tokens, D model width, K frames per chunk,
Q student steps.

Conventions (the same as Wan2.1 and the official CausVid release):
  * A video is (B, F, C, H, W) everywhere outside the DiT; a chunk is a slice of K frames along F.
  * Timesteps t live in [0, 1000]; t = 1000 is pure noise, t = 0 is clean data. Every timestep
    tensor is per frame, (B, F): chunks of one clip can sit at different noise levels.
  * With s = t / 1000:  x_t = (1 - s) x0 + s eps  (rectified flow, Eq. 1 with alpha = 1 - sigma).
  * The network predicts the velocity v = eps - x0, hence  x0 = x_t - s v.
"""

import functools
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


class CausVidError(ValueError):
    """A mistake the user can fix (a setting, a path, an input): the scripts print it as a line."""


# ------------------------------------------------------------------------------------------------
# 1. Config and presets
# ------------------------------------------------------------------------------------------------


@dataclass
class Config:
    name: str = "tiny"

    # The space the DiT works in: RGB pixels in [-1, 1] for the toy world, VAE latents for Wan.
    channels: int = 3
    height: int = 16  # latent frame height and width
    width: int = 16
    num_frames: int = 12  # latent frames of one training clip
    chunk_size: int = 3  # K: frames per chunk, the unit of causality (Eq. 5) and of streaming

    # The DiT (Wan2.1's architecture).
    patch_size: tuple[int, int, int] = (1, 4, 4)  # (frames, rows, cols); frames must be 1
    dim: int = 128
    ffn_dim: int = 512
    num_heads: int = 4
    num_layers: int = 4
    freq_dim: int = 256  # sinusoidal time-embedding width
    text_dim: int = 64  # width of the text encoder's output
    text_len: int = 32  # prompts are padded or truncated to this many tokens
    eps: float = 1e-6
    text_encoder: str = "tiny"  # "tiny": a small random UMT5 kept in the checkpoint; or a directory
    vae: str = ""  # "": none (the toy world is pixels); or a diffusers AutoencoderKLWan directory
    negative_prompt: str = ""  # the "unconditional" prompt of classifier-free guidance

    # Flow matching and sampling (Sec. 3.1).
    shift: float = 3.0  # timestep shift s' = shift s / (1 + (shift - 1) s), training and sampling
    teacher_steps: int = 24  # Euler steps of the teacher's ODE sampler
    teacher_guidance: float = 3.0  # the teacher's CFG scale when it samples (the ODE pairs)
    student_step_indices: tuple[int, ...] = (0, 6, 12, 18)  # the student's steps, by index into
    #                                                          the teacher's schedule

    # Training (AdamW everywhere); the global batch is ranks x accumulate x batch_size.
    batch_size: int = 32
    accumulate: int = 1  # micro-batches per optimizer step (and rank)
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False  # recompute each block in backward
    clean_context: bool = True  # Alg. 1's T = {0, t1..tQ}: a chunk may be drawn clean, as context

    # Flow-matching pre-training where no pretrained model exists (the toy teacher).
    teacher_train_steps: int = 16000
    lr_teacher: float = 3e-3  # peak; linear warm-up, cosine decay
    warmup: int = 200
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1  # share of empty prompts, so that CFG works

    # Stage 1: ODE initialisation (Sec. 4.3).
    ode_pairs: int = 512
    ode_pair_stride: int = 2  # the pairs' teacher takes every stride-th step of its teacher_steps
    #                           schedule: the same t at the student's steps, 1 / stride the forwards
    ode_steps: int = 300
    lr_ode: float = 2e-4

    # Stage 2: DMD (Sec. 4.2, Alg. 1).
    dmd_steps: int = 300  # iterations, each a critic update
    critic_updates_per_generator: int = 5  # two time-scale update rule (DMD2)
    lr_generator: float = 5e-5
    lr_critic: float = 5e-5
    real_guidance: float = 3.0  # CFG of the real score: uncond + g (cond - uncond)
    dmd_beta1: float = 0.9  # Adam's beta1 of generator and critic
    generator_ema: float = 0.0  # > 0: the student saved is an EMA of the generator ...
    generator_ema_start: int = 0  # ... from this iteration on
    dmd_shift: float = 0.0  # DMD's noising t ~ U[0, 1000) shifted by this; 0: by `shift`
    dmd_t_min: float = 20.0  # DMD's noising t is kept away from both ends
    dmd_t_max: float = 980.0
    critic_warmup: int = 0  # critic-only iterations before the generator's first update
    backward_simulation: bool = False  # DMD2 Sec. 4.5: generator inputs from its own rollout

    # Successors (successors.py), off by default. Self-Forcing:
    self_forcing: bool = False  # DMD on the student's own KV-cached rollout
    # Causal Forcing:
    causal_ode_init: bool = False  # ODE pairs from a causal diffusion teacher's own sampler
    causal_teacher_steps: int = 10000  # toy world: that teacher's teacher-forcing steps
    lr_causal_teacher: float = 1e-3  # its peak learning rate (warm-up, cosine, EMA)
    # A rolling KV cache for long videos (a window that never re-encodes):
    sink: int = -1  # -1: the official re-encoding window; n >= 0: a rolling cache keeping n frames
    # the RoPE gap between the sink and the recent frames: 0 none, k at most k, -1 all evicted
    sink_gap: int = 0
    # The first chunk (Diagonal Distillation, Causal Forcing++): its own steps, by index into the
    # teacher's schedule, in the rollout and in sampling; (): the student's, as every chunk's
    first_chunk_step_indices: tuple[int, ...] = ()
    # Causal Forcing++: stage 1 (ode_steps at lr_ode) by causal consistency distillation on data
    consistency_init: bool = False
    consistency_grid: int = 48  # its t's: the teacher's sampling schedule at this many steps
    consistency_ema: float = 0.99  # its target network, an EMA of the student (saved as stage 1)


# Wan2.1's default negative prompt (its sample_neg_prompt): CFG's "unconditional" branch
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，"
    "作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)

PRESETS: dict[str, Config] = {
    # the toy world (shared/toy_world.md), trains on a CPU
    "tiny": Config(),
    # the official CausVid release's Wan2.1-T2V-1.3B recipe
    "wan2.1-t2v-1.3b": Config(
        name="wan2.1-t2v-1.3b",
        channels=16,
        height=60,  # 480 x 832 pixels / 8
        width=104,
        num_frames=21,  # 81 video frames = 1 + 4 x 20 -> 21 latent frames
        chunk_size=3,
        patch_size=(1, 2, 2),
        dim=1536,
        ffn_dim=8960,
        num_heads=12,
        num_layers=30,
        freq_dim=256,
        text_dim=4096,  # UMT5-XXL
        text_len=512,
        text_encoder="",  # set from --model-dir (or --text-encoder / --vae)
        vae="",
        negative_prompt=WAN_NEGATIVE_PROMPT,
        shift=8.0,
        teacher_steps=50,  # ODE pairs: 50 Euler steps, CFG 6
        ode_pair_stride=1,
        teacher_guidance=6.0,
        student_step_indices=(0, 36, 44),  # t = [1000, 757, 522] on the shifted 50-step schedule
        batch_size=1,
        grad_clip=10.0,
        gradient_checkpointing=True,
        ode_pairs=1000,  # the paper: 1000 pairs, 3000 iterations
        ode_steps=3000,
        lr_ode=2e-6,
        dmd_steps=6000,
        lr_generator=2e-6,
        lr_critic=2e-6,
        real_guidance=4.5,  # the official cond + 3.5 (cond - uncond) = uncond + 4.5 (cond - uncond)
        sink=3,  # long videos keep the first chunk: latent frame 0 (one pixel frame) is unlike
        #          the others
    ),
}


def get_config(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise CausVidError(f"unknown config {name!r}; choose one of {sorted(PRESETS)}")
    return Config(**{**asdict(PRESETS[name]), **overrides})


def config_from_dict(d: dict) -> Config:
    """A config read back from a checkpoint's JSON header: lists become tuples, unknown keys go."""
    known = {f.name for f in fields(Config)}
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


# ------------------------------------------------------------------------------------------------
# 2. Flow matching (Sec. 3.1)
# ------------------------------------------------------------------------------------------------


def _s(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Noise level s = t / 1000 of per-frame timesteps (B, F), broadcastable to x (B, F, ...)."""
    return (t / 1000).to(x.dtype).reshape(*t.shape, *[1] * (x.ndim - t.ndim))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. 1 as rectified flow: x_t = (1 - s) x0 + s eps."""
    s = _s(t, x0)
    return (1 - s) * x0 + s * eps


def velocity_to_x0(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = x0 + s (eps - x0) = x0 + s v, so the clean sample is x0 = x_t - s v (official #50)."""
    return x_t - _s(t, x_t) * v


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift: a larger shift spends more of the schedule at high noise."""
    s = t / 1000
    return 1000 * shift * s / (1 + (shift - 1) * s)


def sampling_schedule(steps: int, shift: float) -> torch.Tensor:
    """The teacher's `steps` timesteps from 1000 down (0 excluded), shifted, float64."""
    uniform = 1000 * torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]
    return shift_timesteps(uniform, shift)


def student_timesteps(cfg: Config) -> torch.Tensor:
    """The student's few steps (Alg. 1's T without 0, Alg. 2's t_Q..t_1), high noise first, float32.

    They are picked from the teacher's shifted schedule by index -- the official [0, 36, 44] of 50
    steps with shift 8 gives t = [1000, 757, 522] (official #53) -- so every student timestep is a
    point the teacher's ODE trajectory passes through and the ODE pairs need no interpolation.
    """
    indices = cfg.student_step_indices
    if not 0 <= min(indices) <= max(indices) < cfg.teacher_steps:
        raise CausVidError(
            f"student_step_indices {indices} must index the teacher's {cfg.teacher_steps}-step "
            f"schedule (0 .. {cfg.teacher_steps - 1}); scale them with teacher_steps"
        )
    return sampling_schedule(cfg.teacher_steps, cfg.shift)[list(indices)].float()


def flow_matching_loss(model: Callable, x0: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
    """Eq. 2 in the flow parametrisation: regress the velocity eps - x0 at x_t; t (B, F) per frame.
    Trains the toy teacher and, on the generator's samples, DMD's critic (Alg. 1 lines 12-14)."""
    eps = torch.randn_like(x0)
    v = model(add_noise(x0, eps, t), t, text)
    return F.mse_loss(v.float(), (eps - x0).float())


def guided_velocity(model: Callable, x, t, text, uncond, guidance: float) -> torch.Tensor:
    """Classifier-free guidance, uncond + g (cond - uncond), both halves in one batched forward."""
    if guidance == 1.0 or uncond is None:
        return model(x, t, text)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, uncond.expand_as(text)]))
    v_cond, v_uncond = both.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def sample_ode(
    model: Callable, noise, text, uncond=None, guidance=1.0, steps=50, shift=1.0, keep=()
):
    """Euler integration of the probability-flow ODE dx/ds = v from s = 1 (noise) to s = 0.

    keep: indices into the schedule at which to record the state (the ODE pairs of Sec. 4.3).
    Returns x0 (B, F, C, H, W) and the kept states followed by x0, stacked along dim 1.
    """
    if any(not 0 <= i < steps for i in keep):
        raise ValueError(f"keep indices {keep} must lie in the {steps}-step schedule")
    ts = torch.cat([sampling_schedule(steps, shift), torch.zeros(1, dtype=torch.float64)])
    x = noise
    kept = []
    for i in range(steps):
        if i in keep:
            kept.append(x)
        t = torch.full(x.shape[:2], float(ts[i]), device=x.device)
        v = guided_velocity(model, x, t, text, uncond, guidance)
        x = x + float(ts[i + 1] - ts[i]) / 1000 * v  # s decreases by (t_i - t_{i+1}) / 1000
    return x, torch.stack(kept + [x], dim=1)


# ------------------------------------------------------------------------------------------------
# 3. DiT building blocks: time embedding, 3D RoPE, per-frame modulation
# ------------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(...,) timesteps in [0, 1000] -> (..., dim): [cos, sin] at frequencies 10000^(-k / half)."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64, device=t.device)
    angles = t.double().unsqueeze(-1) * torch.pow(10000.0, -k / half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def rope_angles(head_dim: int, frames: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """3D RoPE angles (frames * rows * cols, head_dim / 2), tokens in (f, h, w) order.

    Wan2.1 splits the head into a time part of head_dim - 4 (head_dim // 6) channels and two spatial
    parts of 2 (head_dim // 6); each rotates channel pairs by position x 10000^(-2k / part). Frames
    sit at time positions 0, 1, ...: a chunk streamed after c cached frames takes rows c.. (Alg. 2).
    """
    d_hw = 2 * (head_dim // 6)
    d_t = head_dim - 2 * d_hw

    def axis(n, d):  # (n, d / 2)
        pos = torch.arange(n, dtype=torch.float64, device=device)
        freqs = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
        return torch.outer(pos, freqs)

    shape = (frames, rows, cols, -1)
    time = axis(frames, d_t)[:, None, None].expand(shape)
    row = axis(rows, d_hw)[None, :, None].expand(shape)
    col = axis(cols, d_hw)[None, None, :].expand(shape)
    return torch.cat([time, row, col], dim=-1).reshape(-1, head_dim // 2)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x (B, S, heads, head_dim): each channel pair (x[2k], x[2k+1]) is a complex number, multiplied
    by e^(i angle) from rotation (S, head_dim / 2)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation[None, :, None]).flatten(-2).type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN per frame: x (B, F*N, D); shift, scale (B, F, D) apply to the N tokens of a frame."""
    x = x.unflatten(1, (shift.shape[1], -1))
    return (x * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).flatten(1, 2)


def gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-frame gate g (B, F, D) on x (B, F*N, D)."""
    return (x.unflatten(1, (g.shape[1], -1)) * g.unsqueeze(2)).flatten(1, 2)


# ------------------------------------------------------------------------------------------------
# 4. Block-causal attention (Sec. 4.1, Eq. 5) and the KV cache (Sec. 4.4, Alg. 2)
# ------------------------------------------------------------------------------------------------


def block_causal_mask(
    num_frames: int, chunk_size: int, tokens_per_frame: int = 1, device=None, cached_frames: int = 0
) -> torch.Tensor:
    """Eq. 5: frame i may attend to frame j iff floor(j / k) <= floor(i / k).

    Bidirectional inside a chunk, causal across chunks. Returns a boolean (S, S_all) mask, True =
    attend, rows are queries, S = num_frames * tokens_per_frame; cached_frames earlier frames (a KV
    cache) come first in the columns and are seen by every query.
    """
    chunk = torch.arange(num_frames, device=device) // chunk_size
    mask = chunk[None, :] <= chunk[:, None]  # [i, j]: chunk(j) <= chunk(i)
    cached = torch.ones(num_frames, cached_frames, dtype=torch.bool, device=device)
    mask = torch.cat([cached, mask], 1)
    return mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


@functools.lru_cache(maxsize=32)  # a BlockMask is built once per shape
def flex_block_mask(
    num_frames: int, chunk_size: int, tokens_per_frame: int = 1, device=None, cached_frames: int = 0
):
    """block_causal_mask as a FlexAttention BlockMask, which lets the kernel skip masked-out blocks
    instead of computing them (the official release's choice on GPUs)."""
    from torch.nn.attention.flex_attention import create_block_mask

    cached = cached_frames * tokens_per_frame
    span = chunk_size * tokens_per_frame

    def mask_mod(b, h, q, kv):
        return (kv < cached) | ((kv - cached) // span <= q // span)

    S = num_frames * tokens_per_frame
    return create_block_mask(mask_mod, None, None, S, cached + S, device=device)


@functools.cache
def compiled(fn):
    """torch.compile(fn), once per function and process."""
    return torch.compile(fn, dynamic=False)


def attend(q, k, v, mask=None):
    """(B, heads, S, d) attention under a dense boolean mask, a FlexAttention BlockMask, or none.
    FlexAttention is one fused kernel only when compiled: on CUDA it is, once per process; on a
    CPU (the tests) it runs eagerly."""
    if mask is None or isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    from torch.nn.attention.flex_attention import flex_attention

    if q.is_cuda:
        return compiled(flex_attention)(q, k, v, block_mask=mask)
    return flex_attention(q, k, v, block_mask=mask)


class KVCache:
    """Self-attention keys and values of the clean context frames, per layer (Alg. 2 line 2).

    A chunk's keys and values are written in place into the slot after the cached frames (buffers
    grow by doubling: a few allocations per stream, not a concatenation per forward), and commit()
    makes them part of the cache (Alg. 2 line 12); until then the next denoising step overwrites the
    slot, as in the official release. Keys are stored after RoPE: each cached frame keeps the
    position it was encoded at; a new chunk sits at positions num_frames, ... and attends to the
    whole cache plus itself with no mask. The cache holds only the past, so block-causality holds by
    construction ("block-wise causal attention is no longer needed at inference time", Sec. 4.4).
    The cache serves inference: nothing is trained through it (Self-Forcing's rollout, which is,
    uses successors.RolloutKVCache).
    """

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}  # layer -> (B, capacity, heads, head_dim)
        self.v: dict[int, torch.Tensor] = {}
        self.num_frames = 0  # what the cache holds
        self.num_tokens = 0

    @property
    def next_position(self) -> int:
        """The RoPE time position of the next frame: the cached frames come first."""
        return self.num_frames

    def attend_to(self, layer: int, k, v, rotation):
        """k (before RoPE), v (B, S, heads, head_dim) of a chunk's S tokens; rotation (S_all,
        head_dim / 2) for the cache's positions and the chunk's. -> the keys and values the chunk
        attends over: the cache's, then its own (Alg. 2 line 7)."""
        start = rotation.shape[0] - k.shape[1]
        k = apply_rope(k, rotation[start:])
        return self.write(layer, k, v)

    def write(self, layer: int, k, v):
        """Write a chunk's k, v (B, S, heads, head_dim) into the slot after the cached tokens.
        -> every key and value up to the chunk's last, (B, num_tokens + S, heads, head_dim)."""
        if k.requires_grad:
            raise RuntimeError("a KVCache serves inference (no_grad): train through RolloutKVCache")
        start = self.num_tokens
        end = start + k.shape[1]
        for store, new in ((self.k, k), (self.v, v)):
            if layer not in store or store[layer].shape[1] < end:  # allocate, or grow by doubling
                buffer = new.new_empty(new.shape[0], 2 * end, *new.shape[2:])
                if layer in store:
                    buffer[:, :start] = store[layer][:, :start]
                store[layer] = buffer
            store[layer][:, start:end] = new
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def commit(self, frames: int, tokens: int):
        """Alg. 2 line 12: the frames just written join the cache."""
        self.num_frames += frames
        self.num_tokens += tokens


# ------------------------------------------------------------------------------------------------
# 5. The DiT (Wan2.1's architecture; module names are Wan's own, so its weights load unchanged)
# ------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Self-attention with q/k RMSNorm over the whole width and 3D RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, S, D) -> (B, S, heads, head_dim)."""
        return rearrange(y, "b s (n d) -> b s n d", n=self.num_heads)

    def forward(self, x, rotation, mask=None, cache: KVCache | None = None, layer: int = 0):
        """x (B, S, D); rotation (S_all, head_dim / 2), its last S rows x's positions;
        mask: (S, S_all) bool, a BlockMask or None; cache: the past's keys and values (layer: which
        of them)."""
        q = apply_rope(self.heads(self.norm_q(self.q(x))), rotation[-x.shape[1] :])
        k = self.heads(self.norm_k(self.k(x)))  # (B, S, heads, head_dim)
        v = self.heads(self.v(x))
        if cache is None:
            k = apply_rope(k, rotation)
        else:  # the cache's keys and values, then the chunk's own
            k, v = cache.attend_to(layer, k, v, rotation)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return self.o(rearrange(out, "b n s d -> b s (n d)"))


class CrossAttention(SelfAttention):
    """Video tokens attend to text tokens (the same layers, another forward). Text enters only
    here, never through the time modulation, so per-frame timesteps cannot carry information
    between chunks (official #1, #21)."""

    def forward(self, x, text):
        """x (B, S, D), text (B, L, D) -> (B, S, D)."""
        q = self.heads(self.norm_q(self.q(x))).transpose(1, 2)  # (B, heads, S, head_dim)
        k = self.heads(self.norm_k(self.k(text))).transpose(1, 2)
        v = self.heads(self.v(text)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(rearrange(out, "b n s d -> b s (n d)"))


class Block(nn.Module):
    """Wan2.1's block: adaLN self-attention, cross-attention (affine norm, no gate), adaLN FFN."""

    def __init__(self, cfg: Config):
        super().__init__()
        D = cfg.dim
        self.norm1 = nn.LayerNorm(D, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(D, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(D, eps=cfg.eps)  # Wan's name for the cross-attention norm
        self.cross_attn = CrossAttention(D, cfg.num_heads, cfg.eps)
        self.norm2 = nn.LayerNorm(D, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(D, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, D)
        )
        # a learned table added to the time embedding
        self.modulation = nn.Parameter(torch.zeros(1, 6, D))

    def forward(self, x, e, text, rotation, mask=None, cache=None, layer=0):
        """x (B, S, D); e (B, F, 6, D) per-frame time modulation; text (B, L, D)."""
        modulation = (self.modulation.unsqueeze(1) + e).unbind(2)  # six (B, F, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation
        y = self.self_attn(modulate(self.norm1(x), shift1, scale1), rotation, mask, cache, layer)
        x = x + gate(y, gate1)
        x = x + self.cross_attn(self.norm3(x), text)
        y = self.ffn(modulate(self.norm2(x), shift2, scale2))
        return x + gate(y, gate2)


class Head(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x, e0):
        """x (B, S, D); e0 (B, F, D) the time embedding *before* the 6-way projection."""
        shift, scale = (self.modulation.unsqueeze(1) + e0.unsqueeze(2)).unbind(2)
        return self.head(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Wan2.1's DiT. One class for CausVid's three roles (Fig. 6): the bidirectional teacher s_data
    (causal=False), the block-causal student G (causal=True), and the critic s_gen (a copy of the
    teacher). attention: how the block mask is applied -- "auto" (FlexAttention on CUDA, SDPA with
    the dense mask elsewhere), "flex" or "sdpa"."""

    def __init__(self, cfg: Config, causal: bool = False):
        super().__init__()
        if cfg.patch_size[0] != 1:
            raise ValueError(
                "per-frame timesteps need patch_size[0] == 1 (one latent frame per row)"
            )
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"dim {cfg.dim} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        self.causal = causal
        self.attention = "auto"
        self.gradient_checkpointing = False
        D = cfg.dim
        self.patch_embedding = nn.Conv3d(
            cfg.channels, D, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        """The one place for init. Xavier linears, zero biases; adaLN-Zero: the time projection, the
        gate rows of every modulation table and the output layer start at zero, so a fresh model is
        the identity on its residual stream and predicts v = 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for m in [*self.text_embedding, *self.time_embedding]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.modulation, std=self.cfg.dim**-0.5)
            with torch.no_grad():
                block.modulation[:, [2, 5]] = 0  # the gates of self-attention and FFN
        nn.init.normal_(self.head.modulation, std=self.cfg.dim**-0.5)
        for m in [self.time_projection[1], self.head.head]:
            nn.init.zeros_(m.weight)

    def forward(self, x, t, text, cache: KVCache | None = None, write_cache: bool = False):
        """The velocity v = eps - x0 of x_t.

        x (B, F, C, H, W) noisy frames; t (B, F) their timesteps; text (B, L, D_text).
        cache=None: the frames are a whole clip; the student masks attention block-causally (Eq. 5).
        cache given: the frames continue the cached context and attend to it plus themselves
        (Alg. 2 line 7); write_cache=True adds their keys/values to it (Alg. 2 lines 11-12).
        """
        B, Fr, C, H, W = x.shape
        cfg = self.cfg
        _, ph, pw = cfg.patch_size
        dtype = self.patch_embedding.weight.dtype  # bf16 weights compute in bf16
        if t.shape != (B, Fr):
            raise ValueError(f"timesteps must have shape (B, F) = {(B, Fr)}, got {tuple(t.shape)}")
        rows, cols = H // ph, W // pw
        x = self.patch_embedding(rearrange(x.to(dtype), "b f c h w -> b c f h w"))
        x = rearrange(x, "b d f h w -> b (f h w) d")
        e0 = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim).to(dtype))  # (B, F, D)
        e = self.time_projection(e0).unflatten(2, (6, cfg.dim))  # (B, F, 6, D)
        text = self.text_embedding(text.to(dtype))  # (B, L, D)

        offset = 0 if cache is None else cache.next_position  # the cache's frames come first
        angles = rope_angles(cfg.dim // cfg.num_heads, offset + Fr, rows, cols, device=x.device)
        rotation = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
        mask = None
        one_chunk_after_a_cache = cache is not None and Fr <= cfg.chunk_size  # needs no mask
        if self.causal and not one_chunk_after_a_cache:
            mask = self.block_mask(Fr, rows * cols, offset, x.device)
        for i, block in enumerate(self.blocks):
            args = (x, e, text, rotation, mask, cache, i)
            if self.gradient_checkpointing and torch.is_grad_enabled():  # keep each block's input
                x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        if write_cache:
            cache.commit(Fr, x.shape[1])
        x = self.head(x, e0)  # (B, S, C * ph * pw)
        return rearrange(
            x, "b (f h w) (ph pw c) -> b f c (h ph) (w pw)", f=Fr, h=rows, w=cols, ph=ph, pw=pw
        )

    def block_mask(self, frames: int, tokens_per_frame: int, cached_frames: int, device):
        """Eq. 5's mask over `frames` frames after `cached_frames`: dense, or FlexAttention's."""
        K = self.cfg.chunk_size
        if frames % K:
            raise ValueError(f"{frames} frames are not a whole number of chunks of {K}")
        if self.attention == "flex" or (self.attention == "auto" and device.type == "cuda"):
            return flex_block_mask(frames, K, tokens_per_frame, device, cached_frames)
        return block_causal_mask(frames, K, tokens_per_frame, device, cached_frames)


def predict_x0(model: Callable, x_t, t, text, **kw) -> torch.Tensor:
    """The model's estimate of the clean frames, x0 = x_t - s v."""
    return velocity_to_x0(x_t, model(x_t, t, text, **kw), t)


# ------------------------------------------------------------------------------------------------
# 6. Streaming generation with the KV cache (Sec. 4.4, Alg. 2)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def fill_cache(model: DiT, cache: KVCache, x0: torch.Tensor, text: torch.Tensor):
    """Alg. 2 lines 10-12: run finished (clean) frames at t = 0 and add their keys and values."""
    t = torch.zeros(x0.shape[:2], device=x0.device)
    model(x0, t, text, cache=cache, write_cache=True)


def renoise(x0: torch.Tensor, t: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Alg. 2 line 8: noise an estimate afresh to the next, lower step t. The noise is drawn on the
    generator's device (a CPU generator gives the same noise on any device)."""
    device = x0.device if generator is None else generator.device
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=device).to(x0.device)
    return add_noise(x0, eps, torch.full(x0.shape[:2], t, device=x0.device))


def denoise_chunk(
    model: Callable, x, text, timesteps, cache: KVCache | None = None, generator=None
):
    """Alg. 2 lines 5-9 for one chunk x (B, K, C, H, W) at timesteps[0]: predict x0 with the cache,
    re-noise it to the next step, ... Returns the clean chunk and the inputs of every step."""
    states = []
    for j, t in enumerate(timesteps):  # line 6
        states.append(x)
        t_x = torch.full(x.shape[:2], float(t), device=x.device)
        x0 = predict_x0(model, x, t_x, text, cache=cache)  # line 7
        if j + 1 < len(timesteps):
            x = renoise(x0, float(timesteps[j + 1]), generator)  # line 8
    return x0, states


# A random stream for line 8's re-noising: one generator, or a function of the chunk index giving
# each chunk its own (then a video's past does not depend on how long it will run).
Rng = torch.Generator | Callable[[int], torch.Generator] | None


def chunk_generator(generator: Rng, c: int) -> torch.Generator | None:
    """The generator chunk c re-noises with."""
    if callable(generator):
        return generator(c)
    return generator


# Alg. 2 line 5's steps: one list (Q,) for every chunk, or a function of the chunk index giving each
# its own (successors.chunk_schedule: more steps for the first chunk).
Steps = torch.Tensor | Callable[[int], torch.Tensor]


def chunk_timesteps(timesteps: Steps, c: int) -> torch.Tensor:
    """The steps chunk c is denoised over."""
    if callable(timesteps):
        return timesteps(c)
    return timesteps


def as_chunks(noise, chunk_size: int) -> Iterator[torch.Tensor]:
    """Noise (B, F, C, H, W) split into chunks of K frames; an iterable of chunks passes through."""
    if not isinstance(noise, torch.Tensor):
        return iter(noise)
    if noise.shape[1] % chunk_size:
        raise ValueError(
            f"{noise.shape[1]} frames are not a whole number of chunks of {chunk_size}"
        )
    return iter(noise.split(chunk_size, dim=1))


@torch.no_grad()
def stream_generate(
    model: DiT, noise, text, timesteps: Steps, generator: Rng = None, context=None, cache=None
) -> Iterator[torch.Tensor]:
    """Alg. 2: generate chunk after chunk with the student's few steps, yielding each clean chunk
    (B, K, C, H, W) as soon as it is done. The applications of Sec. 5.3-5.4 are its arguments:

    noise    each chunk's starting point (line 4): (B, F, C, H, W), or an iterable of
             (B, K, C, H, W) chunks consumed as they arrive. Video-to-video: input chunks noised
             to timesteps[0].
    text     (B, L, D_text), or one such tensor per chunk (dynamic prompting; the cache keeps the
             past).
    timesteps  the student's steps (Q,), or a function of the chunk index (a first chunk with
             steps of its own, successors.chunk_schedule).
    context  clean frames (B, F_c, C, H, W), whole chunks, before the video (image-to-video: the
             image repeated to a chunk). They enter the cache and are not yielded.
    cache    an empty cache to fill (default: a KVCache; successors.RollingKVCache for long videos).
    A finished chunk enters the cache when the next one is started, under that chunk's prompt.
    """
    K = model.cfg.chunk_size
    if context is not None and context.shape[1] % K:
        raise ValueError(
            f"the context's {context.shape[1]} frames are not a whole number of chunks of {K}"
        )
    cache = KVCache() if cache is None else cache  # line 2
    past = context  # clean frames not yet in the cache
    for c, x in enumerate(as_chunks(noise, K)):  # lines 3-4: the chunk's starting noise
        txt = text if isinstance(text, torch.Tensor) else text[c]
        if past is not None:  # lines 10-12 for the chunk before: cache it, clean, at t = 0
            fill_cache(model, cache, past, txt)
        steps = chunk_timesteps(timesteps, c)
        x0, _ = denoise_chunk(
            model, x, txt, steps, cache, chunk_generator(generator, c)
        )  # lines 5-9
        past = x0
        yield x0


@torch.no_grad()
def windowed_generate(
    model: DiT,
    noise,
    text,
    timesteps: Steps,
    generator: Rng = None,
    context=None,
    *,
    window: int,
    keep=None,
) -> Iterator[torch.Tensor]:
    """Long videos as the official release makes them: stream_generate over a cache of at most
    `window` frames, the chunk being made included. When the next chunk would not fit, a fresh
    cache starts from the last `keep` clean frames (default: window - 2 K, at least K), re-encoded
    at positions from 0 -- one forward over them per slide -- and the stream goes on."""
    K = model.cfg.chunk_size
    if keep is None:
        keep = max(K, window - 2 * K)
    if window % K or keep % K or window < 2 * K or not 0 < keep <= window - K:
        raise ValueError(
            f"window {window} and keep {keep} must be whole chunks of {K}, window >= 2 chunks, "
            "0 < keep <= window - one chunk"
        )
    chunks = as_chunks(noise, K)
    past = context  # the clean frames in the window
    made = 0  # chunks yielded so far
    while (first := next(chunks, None)) is not None:
        held = 0 if past is None else past.shape[1]
        if held + K > window:  # slide: start over from the last `keep` frames
            past = past[:, -keep:]
            held = keep
        room = (window - held) // K  # the chunks this window makes
        window_noise = itertools.chain([first], itertools.islice(chunks, room - 1))
        window_text = text if isinstance(text, torch.Tensor) else text[made:]

        def window_rng(c, start=made):  # chunk c of this window is chunk start + c of the video
            return chunk_generator(generator, start + c)

        def window_steps(c, start=made):
            return chunk_timesteps(timesteps, start + c)

        for x0 in stream_generate(model, window_noise, window_text, window_steps, window_rng, past):
            past = x0 if past is None else torch.cat([past, x0], 1)
            made += 1
            yield x0


def velocity_after(model: DiT, past: torch.Tensor, x, t, text, cache=None) -> torch.Tensor:
    """The velocity of x's frames run after the clean frames `past` at t = 0, the past recomputed
    under the block-causal mask (recompute_generate's model)."""
    t_all = torch.cat([t.new_zeros(t.shape[0], past.shape[1]), t], 1)
    return model(torch.cat([past, x], 1), t_all, text)[:, past.shape[1] :]


@torch.no_grad()
def recompute_generate(
    model: DiT, noise, text, timesteps: Steps, generator: Rng = None, context=None
) -> Iterator[torch.Tensor]:
    """Alg. 2 without the KV cache, the baseline the cache is measured against (Table 3): every step
    re-runs the whole clean past at t = 0 under the block-causal mask. Same output, growing cost."""
    past = [] if context is None else [context]
    for c, x in enumerate(as_chunks(noise, model.cfg.chunk_size)):
        clean = torch.cat(past, 1) if past else x[:, :0]  # the clean frames so far (maybe none)
        with_past = functools.partial(velocity_after, model, clean)
        steps = chunk_timesteps(timesteps, c)
        x0, _ = denoise_chunk(with_past, x, text, steps, None, chunk_generator(generator, c))
        past.append(x0)
        yield x0


@torch.no_grad()
def sample_ode_causal(
    model: DiT, noise, text, uncond=None, guidance=1.0, steps=50, shift=1.0, keep=(), context=None
):
    """The many-step sampler of a *causal* diffusion model (Table 4's baseline; Fig. 8): sample_ode
    with CFG, chunk by chunk, each chunk over the KV cache of the clean chunks before it (Alg. 2's
    cache). The cache is batched [cond; uncond] when guided, so one forward serves both branches.
    context: clean frames before the video, at positions from 0. Returns what sample_ode does."""
    guided = uncond is not None and guidance != 1.0
    both = torch.cat([text, uncond.expand_as(text)]) if guided else text
    copies = 2 if guided else 1
    cache = KVCache()
    trajectories = []
    if context is not None:
        fill_cache(model, cache, torch.cat([context] * copies), both)
    cached_model = functools.partial(model, cache=cache)
    for x in noise.split(model.cfg.chunk_size, dim=1):
        x0, trajectory = sample_ode(cached_model, x, text, uncond, guidance, steps, shift, keep)
        fill_cache(model, cache, torch.cat([x0] * copies), both)
        trajectories.append(trajectory)
    trajectory = torch.cat(trajectories, 2)  # (B, len(keep) + 1, F, C, H, W)
    return trajectory[:, -1], trajectory


# ------------------------------------------------------------------------------------------------
# 7. ODE initialisation (Sec. 4.3, Eq. 6)
# ------------------------------------------------------------------------------------------------


def chunkwise_step_indices(
    B: int, num_frames: int, chunk_size: int, num_steps: int, device=None, generator=None
) -> torch.Tensor:
    """Alg. 1 line 5: an independent random step per chunk, repeated over its frames -> (B, F)."""
    shape = (B, num_frames // chunk_size)
    idx = torch.randint(0, num_steps, shape, generator=generator, device=device)
    return idx.repeat_interleave(chunk_size, dim=1)


def with_clean_step(timesteps: torch.Tensor) -> torch.Tensor:
    """Alg. 1's T = {0, t1, ..., tQ}: the student's steps and t = 0, a clean chunk (the official
    denoising_step_list's trailing 0)."""
    return torch.cat([timesteps, timesteps.new_zeros(1)])


def chunkwise_states(
    states: torch.Tensor, timesteps: torch.Tensor, chunk_size: int, clean_context=True
):
    """states (B, Q+1, F, C, H, W): a clip at each of the Q student steps, then clean (t = 0). Draws
    each chunk's step (the clean one too if clean_context) -> (x_t (B, F, C, H, W), t (B, F))."""
    B, Q1, Fr = states.shape[:3]
    num_steps = Q1 if clean_context else Q1 - 1
    idx = chunkwise_step_indices(B, Fr, chunk_size, num_steps, device=states.device)
    rows = torch.arange(B, device=idx.device)[:, None]
    frames = torch.arange(Fr, device=idx.device)
    x_t = states[rows, idx, frames]
    return x_t, with_clean_step(timesteps.to(states.device))[idx]


def ode_regression_loss(
    student: Callable,
    trajectory: torch.Tensor,
    text,
    timesteps,
    chunk_size: int,
    clean_context=True,
) -> torch.Tensor:
    """Eq. 6: || G({x^i_{t_i}}, {t_i}) - {x^i_0} ||^2, every chunk i at its own student step t_i.

    trajectory (B, Q+1, F, C, H, W): the teacher's ODE states at the Q student timesteps, then the
    ODE's end point x0 (sample_ode(..., keep=student_step_indices)). With clean_context a chunk may
    be the end point itself at t = 0 -- context for the chunks after it, as at inference; it has
    nothing to regress (x0 = x_t) and is left out of the loss.
    """
    x_t, t = chunkwise_states(trajectory, timesteps, chunk_size, clean_context)
    x0_hat = predict_x0(student, x_t, t, text).float()
    error = (x0_hat - trajectory[:, -1].float()).pow(2).flatten(2).mean(2)  # (B, F)
    noisy = t > 0
    return torch.where(noisy, error, 0.0).sum() / noisy.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------
# 8. Asymmetric distribution matching distillation (Sec. 3.2, 4.2, Alg. 1, Eq. 4)
# ------------------------------------------------------------------------------------------------


def generator_x0(
    generator: Callable, x0_data: torch.Tensor, text, timesteps, chunk_size: int, clean_context=True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alg. 1 lines 5-7 on line 4's clip: noise each chunk to its own random step of T; the
    block-causal student predicts the clean clip -> (x0_hat (B, F, C, H, W) with grad, each frame's
    step t (B, F)). A chunk drawn at t = 0 (clean_context) is the data chunk itself: context."""
    B, Fr = x0_data.shape[:2]
    ts = timesteps.to(x0_data.device)
    if clean_context:
        ts = with_clean_step(ts)
    t = ts[chunkwise_step_indices(B, Fr, chunk_size, len(ts), device=x0_data.device)]
    x_t = add_noise(x0_data, torch.randn_like(x0_data), t)
    return predict_x0(generator, x_t, t, text), t


@torch.no_grad()
def backward_simulation(generator: DiT, noise, text, timesteps, rng=None) -> torch.Tensor:
    """DMD2 Sec. 4.5 (the official release's option): roll the student out with Alg. 2 from noise
    and keep what it met -- each chunk's input at every student step and its clean output, which
    the later chunks saw as context. Returns states (B, Q+1, F, C, H, W) for chunkwise_states, in
    place of noised data."""
    cache = KVCache()
    states = []
    for x in noise.split(generator.cfg.chunk_size, dim=1):
        x0, inputs = denoise_chunk(generator, x, text, timesteps, cache, rng)
        fill_cache(generator, cache, x0, text)
        states.append(torch.stack(inputs + [x0], 1))
    return torch.cat(states, 2)


def dmd_timesteps(B: int, num_frames: int, shift: float, t_min=20.0, t_max=980.0, device=None):
    """Alg. 1 line 8: one t per sample for the whole clip, t ~ U[0, 1000) shifted and clamped to
    [t_min, t_max] (near the ends real and fake scores barely differ) -> (B, F)."""
    t = shift_timesteps(torch.rand(B, device=device) * 1000, shift).clamp(t_min, t_max)
    return t[:, None].expand(B, num_frames)


def dmd_loss(x0, t, teacher: Callable, critic: Callable, text, uncond=None, guidance: float = 1.0):
    """The generator's DMD loss (Eq. 4, Alg. 1 lines 9-10); x0 (B, F, C, H, W) with grad, t (B, F)
    from line 8.

    Noise x0 to t and ask both score models for their clean estimate: the frozen bidirectional
    teacher with CFG (s_data, the "real" score) and the critic (s_gen, the "fake" score). For
    x_t = (1 - s) x0 + s eps the score is -(x_t - (1 - s) x0_hat) / s^2, so
        s_data - s_gen = (1 - s) / s^2 * (real_x0 - fake_x0),
    and Eq. 4's gradient is proportional to (fake_x0 - real_x0) dG/dphi. DMD replaces the weight
    (1 - s) / s^2 by 1 / mean|x0 - real_x0| per sample, which evens out the step size across t.
    Why 0.5 * mse(x0, (x0 - grad).detach()) (official #44): its derivative in x0 is grad / n and the
    target is a constant, so backprop delivers exactly grad * dx0/dphi -- Eq. 4 -- to the
    generator, without differentiating either score model. Returns (loss, grad (B, F, C, H, W)).
    """
    with torch.no_grad():
        x_t = add_noise(x0, torch.randn_like(x0), t)  # line 9
        fake_x0 = predict_x0(critic, x_t, t, text)
        real_v = guided_velocity(teacher, x_t, t, text, uncond, guidance)
        real_x0 = velocity_to_x0(x_t, real_v, t)
        weight = (x0 - real_x0).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
        grad = torch.nan_to_num((fake_x0 - real_x0) / weight)
    target = (x0.double() - grad.double()).detach()
    loss = 0.5 * F.mse_loss(x0.double(), target)  # line 10
    return loss, grad


def critic_loss(critic: Callable, x0_gen: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
    """Alg. 1 lines 11-14: the denoising loss (Eq. 2) of s_gen on the generator's samples at a
    fresh t (B, F), with fresh noise; x0_gen is detached, so only the critic learns."""
    return flow_matching_loss(critic, x0_gen.detach(), t, text)
