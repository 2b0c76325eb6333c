"""CausVid in one file: a block-causal video DiT distilled from a bidirectional teacher.

Paper: Yin, Zhang, Zhang, Freeman, Durand, Shechtman, Huang. "From Slow Bidirectional to
Fast Autoregressive Video Diffusion Models", CVPR 2025, arXiv 2412.07772.

The method, in the order this file defines it:
  Sec. 3.1       flow matching: the noising process, velocity <-> x0, the teacher's ODE sampler
  Sec. 4.1       the DiT (Wan2.1's architecture, so official weights load) with the block-causal
                 mask of Eq. 5
  Sec. 4.4       the KV cache and the streaming generator of Alg. 2
  Sec. 4.3       ODE initialisation (Eq. 6)
  Sec. 3.2, 4.2  asymmetric distribution matching distillation (Eq. 4, Alg. 1)

Shape letters: B batch, F frames, C channels, H height, W width (of the latent frame), N tokens
per frame, S tokens in a sequence, L text tokens, D model width, K frames per chunk.

Conventions (the same as Wan2.1 and the official CausVid release):
  * A video is (B, F, C, H, W) everywhere outside the DiT; a chunk is a slice of K frames along F.
  * Timesteps t live in [0, 1000]; t = 1000 is pure noise, t = 0 is clean data. Every timestep
    tensor is per frame, (B, F): chunks of one clip can sit at different noise levels.
  * With s = t / 1000:  x_t = (1 - s) x0 + s eps  (rectified flow, Eq. 1 with alpha = 1 - sigma).
  * The network predicts the velocity v = eps - x0, hence  x0 = x_t - s v.
"""

import json
import math
import os
import re
import signal
import sys
import threading
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm


class CausVidError(ValueError):
    """Something a user can fix (a path, a flag, an input file, a diverged run). The scripts print
    its message as one line, `error: ...`, and exit with code 2; nothing is half-written."""


# ------------------------------------------------------------------------------------------------
# 1. Config and presets
# ------------------------------------------------------------------------------------------------


@dataclass
class Config:
    name: str = "tiny"
    # The space the DiT works in. For the toy world the "VAE" is the identity: RGB pixels in [-1, 1].
    channels: int = 3
    height: int = 16  # latent frame height
    width: int = 16
    num_frames: int = 12  # latent frames of one training clip
    chunk_size: int = 3  # K: frames per chunk, the unit of causality (Eq. 5) and of streaming
    # DiT (Wan2.1 architecture)
    patch_size: tuple[int, int, int] = (1, 4, 4)  # (frames, rows, cols); frames must be 1
    dim: int = 128
    ffn_dim: int = 512
    num_heads: int = 4
    num_layers: int = 4
    freq_dim: int = 256  # sinusoidal time-embedding width
    text_dim: int = 64  # width of the text encoder's output
    text_len: int = 32  # prompts are padded (with zeros after the encoder) or truncated to this
    eps: float = 1e-6
    # Text encoder: "tiny" = a small random UMT5 over ByT5 bytes (needs no files); otherwise a local
    # directory holding a transformers UMT5 encoder and its tokenizer.
    text_encoder: str = "tiny"
    # VAE: "" = none (the toy world works in pixels); otherwise a local diffusers AutoencoderKLWan
    # directory (Wan2.1-T2V-1.3B-Diffusers/vae).
    vae: str = ""
    negative_prompt: str = ""  # the "unconditional" prompt of classifier-free guidance
    # Flow matching and sampling (Sec. 3.1)
    # Timestep shift s' = shift s / (1 + (shift - 1) s), for training and sampling alike. Where the
    # object goes and how it moves is decided at high noise; shift 3 trains and samples more there.
    shift: float = 3.0
    teacher_steps: int = 24  # Euler steps of the teacher's ODE sampler
    teacher_guidance: float = 3.0  # CFG scale of the teacher when it samples (ODE pairs, baselines)
    # The student's few denoising steps, as indices into the teacher's sampling schedule, so that
    # the ODE pairs of Sec. 4.3 are recorded exactly at the student's timesteps.
    student_step_indices: tuple[int, ...] = (0, 6, 12, 18)  # s = 1, .75, .5, .25 shifted: t = 1000, 900, 750, 500
    # Training draws each chunk's step from the student's steps *and t = 0* (a clean chunk), like the
    # official release's trailing 0 in denoising_step_list: inference conditions every chunk on clean
    # earlier chunks (Alg. 2 lines 10-12), so training must show the student clean context too
    # (official issues #13, #57). False: the student's steps only -- context is then always noisy.
    clean_context: bool = True
    # DMD2 Sec. 4.5 backward simulation (the official release's `backward_simulation`, off in its Wan
    # configs): DMD's generator inputs come from the student's own Alg. 2 rollout from noise -- its
    # re-noised estimates and its own clean chunks as context, exactly what inference feeds it --
    # instead of noised data clips. About twice the DMD time on the toy world.
    backward_simulation: bool = False
    # Toy world only, a diagnostic: the teacher's two roles -- the ODE pairs' trajectories and DMD's real
    # score -- are played by the world's exact denoiser (ExactToyDenoiser), a teacher with no error; the
    # trained toy teacher still initialises the student and the critic.
    exact_teacher: bool = False
    # DMD (Sec. 3.2, 4.2, Alg. 1)
    real_guidance: float = 3.0  # CFG scale of the real score (teacher), uncond + g (cond - uncond)
    dmd_t_min: float = 20.0  # DMD's noising timestep is kept away from both ends
    dmd_t_max: float = 980.0
    critic_updates_per_generator: int = 5  # two time-scale update rule (DMD2)
    # Optimisation (AdamW everywhere)
    batch_size: int = 32
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False  # recompute each block in backward: activations of one block only
    # toy teacher pre-training: stands in for a pretrained model (toy world only)
    teacher_train_steps: int = 6000
    # peak; linear warm-up, cosine decay. Teacher prompt accuracy at 1e-3: 76.6%, 2e-3: 92.2%, 3e-3: 97.9%
    # but no better students (README)
    lr_teacher: float = 2e-3
    warmup: int = 200
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1  # share of empty prompts, so classifier-free guidance works
    # stage 1: ODE initialisation (Sec. 4.3)
    ode_pairs: int = 512
    ode_steps: int = 600
    lr_ode: float = 1e-4
    # stage 2: DMD (iterations; the generator steps every critic_updates_per_generator-th)
    dmd_steps: int = 1000
    lr_generator: float = 5e-5
    lr_critic: float = 5e-5


PRESETS: dict[str, Config] = {
    "tiny": Config(),
    "wan2.1-t2v-1.3b": Config(
        name="wan2.1-t2v-1.3b",
        channels=16,  # Wan VAE latent channels
        height=60,  # 480 x 832 pixels / 8
        width=104,
        num_frames=21,  # 81 video frames -> 1 + 80 / 4 latent frames
        chunk_size=3,  # official release: 3 latent frames per chunk
        patch_size=(1, 2, 2),  # 1560 tokens per latent frame
        dim=1536,
        ffn_dim=8960,
        num_heads=12,
        num_layers=30,
        freq_dim=256,
        text_dim=4096,  # UMT5-XXL
        text_len=512,
        text_encoder="",  # set from --model-dir (<dir>/text_encoder) or --text-encoder
        # Wan2.1's default negative prompt (its sample_neg_prompt): CFG's "unconditional" branch
        negative_prompt="色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                        "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
                        "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走",
        vae="",  # set from --model-dir (<dir>/vae) or --vae
        shift=8.0,  # Wan2.1 T2V sampling shift; CausVid uses the same
        teacher_steps=50,  # ODE pairs: 50 Euler steps of the teacher
        teacher_guidance=6.0,  # ODE pairs: CFG 6 with the negative prompt
        student_step_indices=(0, 36, 44),  # = t [1000, 757, 522] on the shifted 50-step schedule
        # The official code computes cond + 3.5 (cond - uncond), i.e. uncond + 4.5 (cond - uncond).
        real_guidance=4.5,
        dmd_t_min=20.0,
        dmd_t_max=980.0,
        critic_updates_per_generator=5,
        batch_size=1,
        gradient_checkpointing=True,  # three 1.3B models on one 80 GB GPU (README memory table)
        ode_pairs=1000,  # paper: 1000 ODE pairs, 3000 iterations
        ode_steps=3000,
        dmd_steps=6000,  # paper: 6000 DMD iterations
        lr_ode=2e-6,
        lr_generator=2e-6,
        lr_critic=2e-6,
        grad_clip=10.0,
    ),
}


def get_config(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise CausVidError(f"unknown config {name!r}; choose one of {sorted(PRESETS)}")
    return Config(**{**asdict(PRESETS[name]), **overrides})


def config_from_dict(d: dict) -> Config:
    known = {f.name for f in fields(Config)}
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
    return Config(**d)


# ------------------------------------------------------------------------------------------------
# 2. Flow matching (Sec. 3.1)
# ------------------------------------------------------------------------------------------------


def _s(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Noise level s = t / 1000 of per-frame timesteps (B, F), broadcastable against x (B, F, ...)."""
    return (t / 1000).to(x.dtype).reshape(*t.shape, *[1] * (x.ndim - t.ndim))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. 1 as rectified flow: x_t = (1 - s) x0 + s eps."""
    s = _s(t, x0)
    return (1 - s) * x0 + s * eps


def velocity_to_x0(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = x0 + s (eps - x0) = x0 + s v, so the clean sample is x0 = x_t - s v."""
    return x_t - _s(t, x_t) * v


def x0_to_velocity(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Inverse of velocity_to_x0 (undefined at t = 0)."""
    return (x_t - x0) / _s(t, x_t)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift: spends more of the schedule at high noise for larger shift."""
    s = t / 1000
    return 1000 * shift * s / (1 + (shift - 1) * s)


def sampling_schedule(steps: int, shift: float) -> torch.Tensor:
    """The teacher's `steps` timesteps from 1000 down (0 excluded), shifted, float64."""
    s = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]
    return shift_timesteps(1000 * s, shift)


def student_timesteps(cfg: Config) -> torch.Tensor:
    """The student's few steps (Alg. 1 'T', Alg. 2 't_Q..t_1'), high noise first, float32.

    They are picked from the teacher's shifted schedule by index (the official release's
    [0, 36, 44] of 50 steps with shift 8 gives t = [1000, 757, 522]), so every student timestep is a
    point the teacher's ODE trajectory passes through and the ODE pairs need no interpolation."""
    if not 0 <= min(cfg.student_step_indices) <= max(cfg.student_step_indices) < cfg.teacher_steps:
        raise CausVidError(f"student_step_indices {cfg.student_step_indices} must index the teacher's "
                           f"{cfg.teacher_steps}-step schedule (0 .. {cfg.teacher_steps - 1}); scale them with teacher_steps")
    ts = sampling_schedule(cfg.teacher_steps, cfg.shift)
    return ts[list(cfg.student_step_indices)].float()


def flow_matching_loss(model: Callable, x0: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Eq. 2 in the flow parametrisation: regress the velocity eps - x0 at x_t.

    Serves teacher pre-training (toy world) and the critic s_gen of DMD (Alg. 1 lines 12-14).
    t: (B, F) per-frame timesteps."""
    eps = torch.randn_like(x0)
    v = model(add_noise(x0, eps, t), t, text)
    return F.mse_loss(v.float(), (eps - x0).float())


def guided_velocity(model, x, t, text, uncond, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + g (cond - uncond), both halves in one batched forward."""
    if guidance == 1.0 or uncond is None:
        return model(x, t, text)
    uncond = uncond.expand_as(text)
    v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, uncond])).chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def sample_ode(model, noise, text, uncond=None, guidance=1.0, steps=50, shift=1.0, keep=()):
    """Euler integration of the probability-flow ODE dx/ds = v from s = 1 (noise) to s = 0.

    keep: indices into the schedule at which to record the state (the ODE pairs of Sec. 4.3).
    Returns x0 (B, F, C, H, W) and, stacked along dim 1, the kept states followed by x0."""
    B, Fr = noise.shape[:2]
    ts = torch.cat([sampling_schedule(steps, shift), torch.zeros(1, dtype=torch.float64)])
    bad = [i for i in keep if not 0 <= i < steps]
    if bad:
        raise ValueError(f"keep indices {bad} lie outside the {steps}-step schedule")
    x, kept = noise, []
    for i in range(steps):
        if i in keep:
            kept.append(x)
        t = torch.full((B, Fr), float(ts[i]), device=x.device)
        v = guided_velocity(model, x, t, text, uncond, guidance)
        x = x + float(ts[i + 1] - ts[i]) / 1000 * v  # s decreases: a step of ds = (t_next - t) / 1000
    return x, torch.stack(kept + [x], dim=1)


# ------------------------------------------------------------------------------------------------
# 3. Text encoder: UMT5 through transformers
# ------------------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Frozen UMT5 encoder. Prompts -> (B, L, D_text), the positions after each prompt's end zeroed,
    as Wan does. The empty prompt "" (or Wan's negative prompt) is the unconditional one."""

    def __init__(self, tokenizer, encoder: nn.Module, text_len: int):
        super().__init__()
        self.tokenizer, self.encoder, self.text_len = tokenizer, encoder.eval().requires_grad_(False), text_len

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise CausVidError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
        for p, n in zip(prompts, map(len, self.tokenizer(list(prompts)).input_ids)):
            if n > self.text_len:  # documented behaviour: truncate, and say so
                warnings.warn(f"prompt {p!r:.60} is {n} tokens, longer than the text length {self.text_len}; "
                              f"only its first {self.text_len} tokens are used", stacklevel=2)
        device = next(self.encoder.parameters()).device
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.text_len, truncation=True,
                             return_tensors="pt")
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        out = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return out * mask.unsqueeze(-1).to(out.dtype)


def tiny_umt5_config(cfg: Config):
    from transformers import UMT5Config

    return UMT5Config(vocab_size=384, d_model=cfg.text_dim, d_kv=16, d_ff=2 * cfg.text_dim, num_layers=2,
                      num_heads=cfg.text_dim // 16, relative_attention_num_buckets=32, dropout_rate=0.0)


def load_umt5(path: str, text_len: int, dtype=torch.float32) -> TextEncoder:
    from transformers import AutoTokenizer, UMT5EncoderModel

    if not os.path.isdir(path):
        raise CausVidError(f"text encoder directory {path!r} not found; pass the directory that holds "
                           "a transformers UMT5 encoder (e.g. Wan2.1-T2V-1.3B-Diffusers/text_encoder)")
    tok_path = os.path.join(os.path.dirname(path.rstrip("/")), "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tok_path if os.path.isdir(tok_path) else path)
    return TextEncoder(tokenizer, UMT5EncoderModel.from_pretrained(path, dtype=dtype), text_len)


def build_text_encoder(cfg: Config, state_dict: dict | None = None, seed: int = 0) -> TextEncoder:
    """For "tiny": a randomly initialised 2-layer UMT5 (seeded) with the file-free ByT5 byte tokenizer;
    its weights are stored with the teacher checkpoint. Otherwise: UMT5 from a local directory."""
    from transformers import ByT5Tokenizer, UMT5EncoderModel

    if cfg.text_encoder != "tiny":
        return load_umt5(cfg.text_encoder, cfg.text_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = UMT5EncoderModel(tiny_umt5_config(cfg))
    if state_dict is not None:
        encoder.load_state_dict(state_dict)
    return TextEncoder(ByT5Tokenizer(), encoder, cfg.text_len)


# ------------------------------------------------------------------------------------------------
# 4. DiT building blocks: time embedding, 3D RoPE, modulation
# ------------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(...,) timesteps in [0, 1000] -> (..., dim): [cos, sin] at frequencies 10000^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.double().unsqueeze(-1) * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def rope_angles(head_dim: int, frames: int, rows: int, cols: int, frame_offset: int = 0,
                device=None, theta: float = 10000.0) -> torch.Tensor:
    """3D RoPE angles, (frames * rows * cols, head_dim / 2), in token order (f, h, w).

    The head dim is split into a time part of head_dim - 4 (head_dim // 6) channels and two spatial
    parts of 2 (head_dim // 6) each (Wan2.1). Each part rotates pairs of channels by position x
    theta^(-2k / part). frame_offset shifts the time positions: a chunk streamed after c cached
    frames sits at positions c, c + 1, ... exactly as in a full forward over the clip (Alg. 2)."""
    d_hw = 2 * (head_dim // 6)
    d_t = head_dim - 2 * d_hw

    def axis(n, d, start):  # (n, d / 2)
        pos = torch.arange(start, start + n, dtype=torch.float64, device=device)
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
        return torch.outer(pos, inv)

    a_t = axis(frames, d_t, frame_offset)[:, None, None].expand(frames, rows, cols, -1)
    a_h = axis(rows, d_hw, 0)[None, :, None].expand(frames, rows, cols, -1)
    a_w = axis(cols, d_hw, 0)[None, None, :].expand(frames, rows, cols, -1)
    return torch.cat([a_t, a_h, a_w], dim=-1).reshape(frames * rows * cols, head_dim // 2)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (x[2k], x[2k+1]) of x (B, S, heads, head_dim) by the angles of
    `rotation` (S, head_dim/2), complex e^(i angle): each pair is one complex number, times e^(i angle)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation[None, :, None]).flatten(-2).type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN per frame: x (B, F*N, D); shift, scale (B, F, D) apply to all N tokens of their frame."""
    Fr = shift.shape[1]
    x = x.unflatten(1, (Fr, -1))
    return (x * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).flatten(1, 2)


def gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-frame gate g (B, F, D) on x (B, F*N, D)."""
    return (x.unflatten(1, (g.shape[1], -1)) * g.unsqueeze(2)).flatten(1, 2)


# ------------------------------------------------------------------------------------------------
# 5. Block-causal attention (Sec. 4.1, Eq. 5)
# ------------------------------------------------------------------------------------------------


def block_causal_mask(num_frames: int, chunk_size: int, tokens_per_frame: int = 1, device=None,
                      cached_frames: int = 0) -> torch.Tensor:
    """Eq. 5: frame i may attend to frame j iff floor(j / k) <= floor(i / k).

    Bidirectional inside a chunk, causal across chunks. Returns a boolean (S, S_all) mask, True =
    attend, rows are queries, with S = num_frames * tokens_per_frame; cached_frames earlier frames
    (a KV cache) come first in the columns and are seen by every query."""
    chunk = torch.arange(num_frames, device=device) // chunk_size
    mask = chunk[None, :] <= chunk[:, None]  # [i, j]: chunk(j) <= chunk(i)
    mask = torch.cat([torch.ones(num_frames, cached_frames, dtype=torch.bool, device=device), mask], 1)
    return mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


# Which kernel applies the block mask: "auto" = FlexAttention on CUDA (it skips the masked-out
# blocks instead of computing them), SDPA with the dense mask elsewhere; or force "flex" / "sdpa".
ATTENTION = "auto"
_FLEX: dict = {}


def flex_block_mask(q_frames: int, kv_frames: int, chunk_size: int, tokens_per_frame: int, device):
    """Eq. 5 as a FlexAttention BlockMask for q_frames new frames after kv_frames - q_frames cached
    ones (which every new token sees). Built once per shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (q_frames, kv_frames, chunk_size, tokens_per_frame, str(device))
    if key not in _FLEX:
        cached, span = (kv_frames - q_frames) * tokens_per_frame, chunk_size * tokens_per_frame

        def mask_mod(b, h, q, kv):
            return (kv < cached) | ((kv - cached) // span <= q // span)

        _FLEX[key] = create_block_mask(mask_mod, None, None, q_frames * tokens_per_frame,
                                       kv_frames * tokens_per_frame, device=device)
    return _FLEX[key]


def attend(q, k, v, mask):
    """(B, heads, S, d) attention under a dense boolean mask, a FlexAttention BlockMask, or none."""
    if mask is None or isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    from torch.nn.attention.flex_attention import flex_attention

    if q.is_cuda:  # compiled, FlexAttention runs as one fused kernel
        _FLEX.setdefault("kernel", torch.compile(flex_attention, dynamic=False))
        return _FLEX["kernel"](q, k, v, block_mask=mask)
    return flex_attention(q, k, v, block_mask=mask)  # eager (slow, exact): for tests on CPU


# ------------------------------------------------------------------------------------------------
# 6. KV cache (Sec. 4.4, Alg. 2)
# ------------------------------------------------------------------------------------------------


class KVCache:
    """Per-layer self-attention keys and values of the clean context frames (Alg. 2 line 2).

    Keys are stored after RoPE, so each cached frame keeps the position it was encoded at; a new
    chunk is encoded at positions num_frames, num_frames + 1, ... A chunk attends to the whole cache
    plus itself with no mask: the cache holds only the past, so block-causality holds by construction
    ("block-wise causal attention is no longer needed at inference time", Sec. 4.4)."""

    def __init__(self):
        self.k: list[torch.Tensor] = []  # per layer (B, S_ctx, heads, head_dim)
        self.v: list[torch.Tensor] = []
        self.num_frames = 0  # frames held = time position of the next frame

    def context(self, layer: int):
        return (self.k[layer], self.v[layer]) if self.num_frames else None

    def append(self, kvs: list[tuple[torch.Tensor, torch.Tensor]], num_frames: int):
        """Alg. 2 line 12: append the new frames' keys/values (given for every layer)."""
        if self.num_frames == 0:
            self.k, self.v = [k for k, _ in kvs], [v for _, v in kvs]
        else:
            self.k = [torch.cat([c, k], dim=1) for c, (k, _) in zip(self.k, kvs)]
            self.v = [torch.cat([c, v], dim=1) for c, (_, v) in zip(self.v, kvs)]
        self.num_frames += num_frames


# ------------------------------------------------------------------------------------------------
# 7. The DiT (Wan2.1 architecture; module names are Wan's original ones so its weights load as-is)
# ------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Self-attention with q/k RMSNorm over the whole width and 3D RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)

    def forward(self, x, rotation, mask=None, context=None):
        """x (B, S, D), rotation (S, head_dim/2) RoPE, mask: (S, S_all) bool, a FlexAttention BlockMask or
        None; context: cached (k, v) or None.
        Returns the output (B, S, D) and this call's (k, v), (B, S, heads, head_dim), for the cache."""
        split = lambda y: rearrange(y, "b s (n d) -> b s n d", n=self.num_heads)
        q = apply_rope(split(self.norm_q(self.q(x))), rotation)
        k = apply_rope(split(self.norm_k(self.k(x))), rotation)
        v = split(self.v(x))
        k_all, v_all = (k, v) if context is None else (torch.cat([context[0], k], 1), torch.cat([context[1], v], 1))
        out = attend(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), mask)
        return self.o(rearrange(out, "b n s d -> b s (n d)")), (k, v)


class CrossAttention(nn.Module):
    """Attention from video tokens to text tokens. Text enters only here, never through the time
    modulation, so per-frame timesteps cannot leak information between chunks (official #1, #21)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)

    def forward(self, x, text):
        """x (B, S, D), text (B, L, D) -> (B, S, D)."""
        split = lambda y: rearrange(y, "b s (n d) -> b n s d", n=self.num_heads)
        q, k, v = split(self.norm_q(self.q(x))), split(self.norm_k(self.k(text))), split(self.v(text))
        return self.o(rearrange(F.scaled_dot_product_attention(q, k, v), "b n s d -> b s (n d)"))


class Block(nn.Module):
    """Wan2.1 block: adaLN self-attention, cross-attention (affine LayerNorm, no gate), adaLN FFN."""

    def __init__(self, cfg: Config):
        super().__init__()
        D = cfg.dim
        self.norm1 = nn.LayerNorm(D, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(D, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(D, eps=cfg.eps)  # Wan's name for the cross-attention norm
        self.cross_attn = CrossAttention(D, cfg.num_heads, cfg.eps)
        self.norm2 = nn.LayerNorm(D, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(D, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, D))
        self.modulation = nn.Parameter(torch.zeros(1, 6, D))  # learned table added to the time embedding

    def forward(self, x, e, text, rotation, mask=None, context=None):
        """x (B, S, D); e (B, F, 6, D) per-frame time modulation; text (B, L, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.unsqueeze(1) + e).unbind(2)  # each (B, F, D)
        y, kv = self.self_attn(modulate(self.norm1(x), shift1, scale1), rotation, mask, context)
        x = x + gate(y, gate1)
        x = x + self.cross_attn(self.norm3(x), text)
        x = x + gate(self.ffn(modulate(self.norm2(x), shift2, scale2)), gate2)
        return x, kv


class Head(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        out = cfg.channels * math.prod(cfg.patch_size)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, out)
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x, e0):
        """x (B, S, D); e0 (B, F, D) the time embedding *before* the 6-way projection."""
        shift, scale = (self.modulation.unsqueeze(1) + e0.unsqueeze(2)).unbind(2)
        return self.head(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Wan2.1's DiT. One class for all three roles of CausVid (Fig. 6):
    the bidirectional teacher s_data (causal=False), the block-causal student G (causal=True), and the
    critic s_gen (initialised from the teacher, bidirectional like it)."""

    def __init__(self, cfg: Config, causal: bool = False):
        super().__init__()
        if cfg.patch_size[0] != 1:
            raise ValueError("per-frame timesteps need patch_size[0] == 1 (one latent frame per token row)")
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"dim {cfg.dim} is not divisible by num_heads {cfg.num_heads}")
        self.cfg, self.causal = cfg, causal
        self.gradient_checkpointing = False  # the scripts turn it on for Wan-sized models
        D = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.channels, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        """The one place for init. Xavier linears, zero biases, adaLN-Zero: the time projection, the
        gate rows of every modulation table and the output layer start at zero, so a fresh model is
        the identity on its residual stream and predicts v = 0."""
        D = self.cfg.dim
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
            nn.init.normal_(block.modulation, std=D**-0.5)
            with torch.no_grad():
                block.modulation[:, [2, 5]] = 0  # the gates of self-attention and FFN
        nn.init.normal_(self.head.modulation, std=D**-0.5)
        for m in [self.time_projection[1], self.head.head]:
            nn.init.zeros_(m.weight)

    def forward(self, x, t, text, cache: KVCache | None = None, write_cache: bool = False):
        """Velocity v = eps - x0 of x_t.

        x (B, F, C, H, W) noisy frames; t (B, F) their timesteps in [0, 1000]; text (B, L, D_text).
        cache=None: the frames are a whole clip; the student masks attention block-causally (Eq. 5).
        cache given: the frames continue the cached context and attend to it plus themselves
        (Alg. 2 line 7); write_cache=True appends their keys/values to it (Alg. 2 lines 11-12)."""
        B, Fr, C, H, W = x.shape
        cfg, (_, ph, pw) = self.cfg, self.cfg.patch_size
        if t.shape != (B, Fr):
            raise ValueError(f"timesteps must have shape (B, F) = {(B, Fr)}, got {tuple(t.shape)}")
        rows, cols = H // ph, W // pw
        N = rows * cols
        x = self.patch_embedding(rearrange(x, "b f c h w -> b c f h w"))
        x = rearrange(x, "b d f h w -> b (f h w) d")  # (B, S = F*N, D)

        e0 = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim))  # (B, F, D)
        e = self.time_projection(e0).unflatten(2, (6, cfg.dim))  # (B, F, 6, D)
        text = self.text_embedding(text)  # (B, L, D)

        offset = cache.num_frames if cache is not None else 0
        angles = rope_angles(cfg.dim // cfg.num_heads, Fr, rows, cols, offset, device=x.device)
        rotation = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)  # (S, head_dim/2)
        mask = None
        if self.causal and (cache is None or Fr > cfg.chunk_size):  # one chunk after a cache needs no mask
            if Fr % cfg.chunk_size:
                raise ValueError(f"{Fr} frames are not a whole number of chunks of {cfg.chunk_size}")
            if ATTENTION == "flex" or (ATTENTION == "auto" and x.is_cuda):
                mask = flex_block_mask(Fr, offset + Fr, cfg.chunk_size, N, x.device)
            else:
                mask = block_causal_mask(Fr, cfg.chunk_size, N, device=x.device, cached_frames=offset)

        kvs = []
        for i, block in enumerate(self.blocks):
            args = (x, e, text, rotation, mask, cache.context(i) if cache is not None else None)
            if self.gradient_checkpointing and torch.is_grad_enabled():  # keep only each block's input
                x, kv = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x, kv = block(*args)
            kvs.append(kv)
        if write_cache:
            cache.append(kvs, Fr)

        x = self.head(x, e0)  # (B, S, C * ph * pw)
        return rearrange(x, "b (f h w) (ph pw c) -> b f c (h ph) (w pw)", f=Fr, h=rows, w=cols, ph=ph, pw=pw)


def predict_x0(model, x_t, t, text, **kw) -> torch.Tensor:
    """The model's estimate of the clean frames, x0 = x_t - s v (official #44, #50)."""
    return velocity_to_x0(x_t, model(x_t, t, text, **kw), t)


# ------------------------------------------------------------------------------------------------
# 8. Streaming generation with the KV cache (Alg. 2)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def fill_cache(model: DiT, cache: KVCache, x0: torch.Tensor, text: torch.Tensor):
    """Alg. 2 lines 10-12: run the finished (clean) frames at t = 0 and append their keys/values."""
    model(x0, torch.zeros(x0.shape[:2], device=x0.device), text, cache=cache, write_cache=True)


@torch.no_grad()
def stream_generate(model: DiT, noise, text, timesteps: torch.Tensor, generator: torch.Generator | None = None,
                    use_cache: bool = True, context: torch.Tensor | None = None, window: int | None = None,
                    keep: int | None = None, stochastic: bool = True, uncond: torch.Tensor | None = None,
                    guidance: float = 1.0, record: list | None = None) -> Iterator[torch.Tensor]:
    """Alg. 2: generate chunk after chunk, each with the few student steps, yielding each clean chunk
    (B, K, C, H, W) as soon as it is done. One loop serves every application of Sec. 5.3-5.4:

    noise      the starting point of every chunk (line 4): (B, F, C, H, W), or any iterable of
               (B, K, C, H, W) chunks, consumed as they arrive. Text-to-video: pure noise at
               timesteps[0] = 1000. Video-to-video (SDEdit): each input chunk noised to timesteps[0],
               with `timesteps` the tail of the student's steps from there on.
    text       (B, L, D_text), or a sequence with one such tensor per chunk (dynamic prompting: the
               prompt may change at any chunk; the cache keeps the visual context).
    timesteps  the student's steps, high noise first; generator draws the re-noising of line 8.
    context    clean frames (B, F_c, C, H, W), whole chunks, that precede the video (image-to-video:
               the image repeated to fill a chunk). They enter the cache and are not yielded.
    window     the most frames one chunk attends over, itself included (default: unbounded). When the
               next chunk would not fit, a fresh cache is started holding the last `keep` clean frames
               (default: window - 2 K, at least K), re-encoded at positions from 0 -- the official long-video
               scheme -- so RoPE never sees a position beyond the window and memory stays bounded.
    use_cache  False is the baseline without Alg. 2's cache: every step re-runs the clean prefix
               (at t = 0) with the block-causal mask -- the same result, at a cost growing with it.
    stochastic line 8 re-noises with fresh noise (Alg. 2). False re-noises with the noise the
               estimate implies, eps = (x_t - (1 - s) x0) / s, which makes each step exactly an Euler
               step of the flow ODE: with the teacher's many-step schedule, uncond and guidance (CFG,
               with a second cache for the unconditional branch) this samples a many-step *causal
               diffusion* model -- the baseline of Table 4 and Fig. 8.
    record     a list that receives every step's input x (B, K, C, H, W), chunk after chunk
               (backward_simulation)."""
    K = model.cfg.chunk_size
    if isinstance(noise, torch.Tensor):
        if noise.shape[1] % K:
            raise ValueError(f"{noise.shape[1]} frames are not a whole number of chunks of {K}")
        noise = noise.split(K, dim=1)
    keep = max(K, window - 2 * K) if window is not None and keep is None else keep
    if window is not None and not (window % K == 0 and window >= 2 * K and 0 < keep <= window - K and keep % K == 0):
        raise ValueError(f"window {window} and keep {keep} must be whole chunks of {K}, window >= 2 chunks, "
                         "0 < keep <= window - one chunk")
    if context is not None and context.shape[1] % K:
        raise ValueError(f"the context's {context.shape[1]} frames are not a whole number of chunks of {K}")
    prefix = [] if context is None else list(context.split(K, dim=1))  # clean frames in the window
    guided = uncond is not None and guidance != 1.0
    caches, cached = [KVCache(), KVCache()], 0  # line 2 (the second: CFG's unconditional branch)
    for c, x in enumerate(noise):  # lines 3-4
        B = x.shape[0]
        txt = text if isinstance(text, torch.Tensor) else text[c]
        texts = [txt, uncond.expand_as(txt)] if guided else [txt]
        if window is not None and (len(prefix) + 1) * K > window:  # slide: fresh cache, positions from 0
            prefix, caches, cached = prefix[-(keep // K):], [KVCache(), KVCache()], 0
        if use_cache and cached < len(prefix):  # lines 10-12 for the chunks finished since (or context)
            for cache, tx in zip(caches, texts):
                fill_cache(model, cache, torch.cat(prefix[cached:], 1), tx)
            cached = len(prefix)
            if window is None:  # nothing will be re-encoded: the cache alone holds the past
                prefix, cached = [], 0
        for j, t in enumerate(timesteps):  # line 6
            tt = torch.full((B, K), float(t), device=x.device)
            if record is not None:
                record.append(x)
            if use_cache:  # line 7
                x0s = [predict_x0(model, x, tt, tx, cache=cache) for cache, tx in zip(caches, texts)]
            else:
                past = torch.zeros(B, len(prefix) * K, device=x.device)
                x0s = [predict_x0(model, torch.cat(prefix + [x], 1), torch.cat([past, tt], 1), tx)[:, -K:]
                       for tx in texts]
            x0 = x0s[1] + guidance * (x0s[0] - x0s[1]) if guided else x0s[0]  # CFG (x0 is affine in v)
            if j + 1 < len(timesteps):  # line 8: re-noise the estimate to the next, lower step
                if stochastic:
                    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,  # a CPU rng on a GPU too
                                      device=generator.device if generator is not None else x0.device).to(x0.device)
                else:
                    eps = (x - (1 - _s(tt, x)) * x0) / _s(tt, x)
                x = add_noise(x0, eps, torch.full((B, K), float(timesteps[j + 1]), device=x.device))
        prefix.append(x0)
        yield x0


# ------------------------------------------------------------------------------------------------
# 9. ODE initialisation (Sec. 4.3, Eq. 6)
# ------------------------------------------------------------------------------------------------


def chunkwise_step_indices(B: int, num_frames: int, chunk_size: int, num_steps: int, device=None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Alg. 1 line 5: an independent random student step per chunk, repeated over the chunk's frames.
    Returns step indices (B, F)."""
    idx = torch.randint(0, num_steps, (B, num_frames // chunk_size), generator=generator, device=device)
    return idx.repeat_interleave(chunk_size, dim=1)


def with_clean_step(timesteps: torch.Tensor) -> torch.Tensor:
    """The student's steps followed by t = 0, a clean chunk (the official denoising_step_list's trailing 0)."""
    return torch.cat([timesteps, timesteps.new_zeros(1)])


def chunkwise_states(states: torch.Tensor, timesteps: torch.Tensor, chunk_size: int, clean_context: bool = True):
    """states (B, Q+1, F, C, H, W): a clip at each of the Q student steps, then clean (t = 0). Draws
    each chunk's step (the clean one too if clean_context) and returns (x_t (B, F, C, H, W), t (B, F))."""
    B, Q1, Fr = states.shape[:3]
    idx = chunkwise_step_indices(B, Fr, chunk_size, Q1 if clean_context else Q1 - 1, device=states.device)
    x_t = states[torch.arange(B, device=idx.device)[:, None], idx, torch.arange(Fr, device=idx.device)]
    return x_t, with_clean_step(timesteps.to(states.device))[idx]


def ode_regression_loss(student: Callable, trajectory: torch.Tensor, text: torch.Tensor,
                        timesteps: torch.Tensor, chunk_size: int, clean_context: bool = True) -> torch.Tensor:
    """Eq. 6: || G({x^i_{t_i}}, {t_i}) - {x^i_0} ||^2 with every chunk i at its own student step t_i.

    trajectory (B, Q+1, F, C, H, W): the teacher's ODE states at the Q student timesteps followed by
    the ODE's end point x0 (sample_ode(..., keep=student_step_indices)). clean_context: a chunk may
    also be drawn at the end point, t = 0 -- clean context for the chunks after it, as at inference;
    such a chunk has nothing to regress (x0 = x_t at t = 0) and is left out of the loss."""
    x_t, t = chunkwise_states(trajectory, timesteps, chunk_size, clean_context)
    x0 = predict_x0(student, x_t, t, text)
    error = (x0.float() - trajectory[:, -1].float()).pow(2).flatten(2).mean(2)  # (B, F)
    noisy = t > 0
    return torch.where(noisy, error, 0.0).sum() / noisy.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------
# 10. Asymmetric distribution matching distillation (Sec. 3.2, 4.2, Alg. 1, Eq. 4)
# ------------------------------------------------------------------------------------------------


def generator_x0(generator: Callable, x0_data: torch.Tensor, text: torch.Tensor, timesteps: torch.Tensor,
                 chunk_size: int, clean_context: bool = True) -> torch.Tensor:
    """Alg. 1 lines 4-7: noise each chunk of a data clip to its own random student step and let the
    (block-causal) student predict the clean clip. Returns x0_hat (B, F, C, H, W), with grad.
    clean_context: a chunk may also be drawn at t = 0, the data chunk itself (the official release's
    trailing 0): clean context for the chunks after it, as at inference. Its x0_hat is the data, so
    it passes no gradient to the generator."""
    B, Fr = x0_data.shape[:2]
    ts = timesteps.to(x0_data.device)
    ts = with_clean_step(ts) if clean_context else ts
    t = ts[chunkwise_step_indices(B, Fr, chunk_size, len(ts), device=x0_data.device)]
    x_t = add_noise(x0_data, torch.randn_like(x0_data), t)
    return predict_x0(generator, x_t, t, text)


@torch.no_grad()
def backward_simulation(generator: DiT, noise: torch.Tensor, text: torch.Tensor, timesteps: torch.Tensor,
                        rng: torch.Generator | None = None) -> torch.Tensor:
    """DMD2 Sec. 4.5 (Config.backward_simulation): roll the student out with Alg. 2 from `noise` and
    keep what it met -- every chunk's input at each student step and its clean output, which the
    chunks after it saw as context. Returns states (B, Q+1, F, C, H, W) for chunkwise_states."""
    inputs = []
    clean = torch.cat(list(stream_generate(generator, noise, text, timesteps, rng, record=inputs)), 1)
    Q = len(timesteps)
    steps = [torch.cat(inputs[j::Q], 1) for j in range(Q)]  # inputs: chunk-major, Q per chunk
    return torch.stack(steps + [clean], 1)


def dmd_timesteps(B: int, num_frames: int, cfg: Config, device=None) -> torch.Tensor:
    """Alg. 1 line 8: one t per sample for the whole clip, t ~ U[0, 1000) shifted like the teacher's
    schedule and clamped to [dmd_t_min, dmd_t_max] (the ends carry no useful score difference)."""
    t = shift_timesteps(torch.rand(B, device=device) * 1000, cfg.shift).clamp(cfg.dmd_t_min, cfg.dmd_t_max)
    return t[:, None].expand(B, num_frames)


def dmd_loss(x0: torch.Tensor, teacher: Callable, critic: Callable, text: torch.Tensor, uncond, cfg: Config):
    """The generator's DMD loss (Eq. 4, Alg. 1 lines 8-10). x0 (B, F, C, H, W): generator output, with grad.

    Noise x0 to a random t, and ask both score models for their clean estimate there: the frozen
    bidirectional teacher with CFG (s_data, the 'real' score) and the critic (s_gen, the 'fake' score).
    For x_t = (1 - s) x0 + s eps the score is -(x_t - (1 - s) x0_hat) / s^2, so
        s_data - s_gen = (1 - s) / s^2 * (real_x0 - fake_x0),
    and Eq. 4's gradient is proportional to (fake_x0 - real_x0) dG/dphi. DMD replaces the weight
    (1 - s) / s^2 by 1 / mean|x0 - real_x0| per sample, which keeps the step size even across t.

    Why 0.5 * mse(x0, (x0 - grad).detach()) (official #44): its derivative with respect to x0 is
    (x0 - (x0 - grad)) / n = grad / n, and the target is a constant, so backprop delivers exactly
    grad * dx0/dphi -- Eq. 4 -- to the generator, without ever differentiating the score models.
    Returns (loss, logs)."""
    B, Fr = x0.shape[:2]
    with torch.no_grad():
        t = dmd_timesteps(B, Fr, cfg, device=x0.device)  # line 8
        x_t = add_noise(x0, torch.randn_like(x0), t)  # line 9
        fake_x0 = predict_x0(critic, x_t, t, text)
        real_x0 = velocity_to_x0(x_t, guided_velocity(teacher, x_t, t, text, uncond, cfg.real_guidance), t)
        dims = tuple(range(1, x0.ndim))
        weight = (x0 - real_x0).abs().mean(dim=dims, keepdim=True)
        grad = torch.nan_to_num((fake_x0 - real_x0) / weight)
    loss = 0.5 * F.mse_loss(x0.double(), (x0.double() - grad.double()).detach())  # line 10
    return loss, {"dmd_grad_norm": grad.norm().item() / B, "dmd_t": t[:, 0].mean().item()}


def critic_loss(critic: Callable, x0_gen: torch.Tensor, text: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Alg. 1 lines 11-14: train s_gen with the denoising loss (Eq. 2) on the generator's samples,
    with fresh noise and a fresh t; x0_gen is detached, so only the critic learns."""
    B, Fr = x0_gen.shape[:2]
    return flow_matching_loss(critic, x0_gen.detach(), dmd_timesteps(B, Fr, cfg, device=x0_gen.device), text)


# ------------------------------------------------------------------------------------------------
# 11. The toy world: Moving Shapes (shared/toy_world.md)
# ------------------------------------------------------------------------------------------------
# 16x16 RGB clips of one coloured shape moving 1 px per frame and bouncing off the walls. Exact
# dynamics, so a generated clip can be scored against every clip its prompt admits.

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
          "magenta": (255, 0, 255), "cyan": (0, 255, 255)}
SHAPES = ("square", "circle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PROMPTS = [f"a {c} {s} moving {d}" for c in COLORS for s in SHAPES for d in DIRECTIONS]  # 48
FRAME, BOX, MAX_POS = 16, 6, 10  # frame side, object box side, largest top-left coordinate


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """"a red circle moving left" -> ("red", "circle", "left")."""
    words = prompt.split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving" or words[1] not in COLORS \
            or words[2] not in SHAPES or words[4] not in DIRECTIONS:
        raise ValueError(f"{prompt!r} is not a toy prompt; expected 'a {{color}} {{shape}} moving {{direction}}' "
                         f"with color in {list(COLORS)}, shape in {list(SHAPES)}, direction in {list(DIRECTIONS)}")
    return words[1], words[2], words[4]


def shape_mask(shape: str) -> torch.Tensor:
    """(6, 6) bool: the square fills the box; the circle keeps pixels whose centre is within 2.9 of
    the box centre (24 pixels)."""
    if shape == "square":
        return torch.ones(BOX, BOX, dtype=torch.bool)
    c = torch.arange(BOX) + 0.5 - BOX / 2
    return c[:, None] ** 2 + c[None, :] ** 2 <= 2.9**2


def trajectory(x: int, y: int, direction: str, num_frames: int) -> list[tuple[int, int]]:
    """Top-left corners of the box over the frames. Per axis, a step that would leave 0..10 first
    flips the velocity, then steps (..., 9, 10, 9, 8, ... at a wall)."""
    vx, vy = DIRECTIONS[direction]
    out = []
    for _ in range(num_frames):
        out.append((x, y))
        if not 0 <= x + vx <= MAX_POS:
            vx = -vx
        if not 0 <= y + vy <= MAX_POS:
            vy = -vy
        x, y = x + vx, y + vy
    return out


def render(prompt: str, x: int, y: int, num_frames: int) -> torch.Tensor:
    """One clip, uint8 (F, 16, 16, 3), black background, box top-left at column x, row y in frame 0."""
    color, shape, direction = parse_prompt(prompt)
    mask, rgb = shape_mask(shape), torch.tensor(COLORS[color], dtype=torch.uint8)
    clip = torch.zeros(num_frames, FRAME, FRAME, 3, dtype=torch.uint8)
    for f, (px, py) in enumerate(trajectory(x, y, direction, num_frames)):
        clip[f, py:py + BOX, px:px + BOX][mask] = rgb
    return clip


_ALL_CLIPS: dict[int, torch.Tensor] = {}


def all_clips(num_frames: int) -> torch.Tensor:
    """Every clip of the world: uint8 (48 prompts, 121 starts, F, 16, 16, 3), start index = y * 11 + x."""
    if num_frames not in _ALL_CLIPS:
        starts = [(x, y) for y in range(MAX_POS + 1) for x in range(MAX_POS + 1)]
        lit = {(sh, d): torch.stack([render(f"a red {sh} moving {d}", x, y, num_frames)[..., :1] > 0
                                     for x, y in starts])
               for sh in SHAPES for d in DIRECTIONS}  # colour only paints: render each motion once
        _ALL_CLIPS[num_frames] = torch.stack([lit[sh, d] * torch.tensor(COLORS[c], dtype=torch.uint8)
                                              for c, sh, d in map(parse_prompt, PROMPTS)])
    return _ALL_CLIPS[num_frames]


def to_model_space(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., F, H, W, 3) -> float (..., F, 3, H, W) in [-1, 1]: the toy world's identity "VAE"."""
    return frames.movedim(-1, -3).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (..., F, 3, H, W) in [-1, 1] -> uint8 (..., F, H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).cpu()


def toy_batch(batch_size: int, num_frames: int, generator: torch.Generator | None = None):
    """Random clips with their prompts: (B, F, 3, 16, 16) in [-1, 1], list of B prompts."""
    p = torch.randint(0, len(PROMPTS), (batch_size,), generator=generator)
    s = torch.randint(0, (MAX_POS + 1) ** 2, (batch_size,), generator=generator)
    return to_model_space(all_clips(num_frames)[p, s]), [PROMPTS[i] for i in p]


def psnr_to_all(frames: torch.Tensor) -> torch.Tensor:
    """PSNR (0-255 scale, whole clip) of each clip against every clip of the world.
    frames uint8 (N, F, 16, 16, 3) -> (N, 48, 121)."""
    x = frames.flatten(1).double()  # (N, P)
    mse = torch.stack([torch.cdist(x, ref.flatten(1).double()) ** 2 for ref in all_clips(frames.shape[1])], 1)
    return 10 * torch.log10(255.0**2 / (mse / x.shape[1]).clamp_min(1e-10))


def axis_of(direction: str) -> int:
    """0 for a horizontal direction (left, right), 1 for a vertical one (up, down)."""
    return 0 if DIRECTIONS[direction][0] else 1


def object_positions(frames: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame, the top-left corner at which the prompt's object (its colour and shape, alone on
    black) fits the frame best, and whether it fits better than an empty frame (the object is there).
    frames uint8 (N, F, 16, 16, 3) -> corners long (N, F, 2) as (x, y), seen bool (N, F)."""
    corners = torch.tensor([(x, y) for y in range(MAX_POS + 1) for x in range(MAX_POS + 1)])
    refs = all_clips(1)[:, :, 0].flatten(2).double()  # (48, 121, P): each prompt's object at every corner
    pos, seen = [], []
    for clip, p in zip(frames.flatten(2).double(), prompts):
        mse = torch.cdist(clip, refs[PROMPTS.index(p)]) ** 2  # (F, 121)
        pos.append(corners[mse.argmin(1)])
        seen.append(mse.amin(1) < (clip**2).sum(1))
    return torch.stack(pos), torch.stack(seen)


def motion_steps(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per frame step, how many px the object moves along the prompt's axis (object_positions), or -1
    where the step is not along the axis: it moves across it too, or the object is missing.
    The world's clips step exactly 1 px every frame, bounces included. -> long (N, F-1)."""
    pos, seen = object_positions(frames, prompts)
    d = (pos[:, 1:] - pos[:, :-1]).abs()  # (N, F-1, 2)
    horizontal = torch.tensor([axis_of(parse_prompt(p)[2]) == 0 for p in prompts])[:, None]
    along, across = d[..., 0].where(horizontal, d[..., 1]), d[..., 1].where(horizontal, d[..., 0])
    return along.where((across == 0) & seen[:, 1:] & seen[:, :-1], -1)


def steady_motion(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per clip, the share of frame steps that move the object exactly as the world does: 1 px along
    the prompt's axis and none across it. frames uint8 (N, F, 16, 16, 3) -> (N,)."""
    return (motion_steps(frames, prompts) == 1).double().mean(1)


def score_toy(frames: torch.Tensor, prompts: list[str]) -> dict:
    """toy_world.md "Scoring": best-fit PSNR against the clips the prompt admits, prompt accuracy
    (is the prompt's best fit at least as good as every other prompt's?), and diversity (distinct
    best-fit starts per prompt relative to as many uniform draws from the 121 starts); plus
    steady motion, the share of frame steps that move the object 1 px along the prompt's axis (and
    motion_steps: the shares that pause, move 1 px, jump 2+ px, or leave the axis), and
    the kinds of error of the wrongly fitted samples (colour, shape, motion axis, direction on the axis)."""
    psnr = psnr_to_all(frames)  # (N, 48, 121)
    steps = motion_steps(frames, prompts)
    shares = {name: hit.double().mean().item() for name, hit in
              [("pause", steps == 0), ("1 px", steps == 1), ("2+ px", steps >= 2), ("off axis / missing", steps < 0)]}
    idx = torch.tensor([PROMPTS.index(p) for p in prompts])
    per_prompt = psnr.amax(2)  # (N, 48)
    best = per_prompt[torch.arange(len(prompts)), idx]
    correct = best >= per_prompt.amax(1)
    start = psnr[torch.arange(len(prompts)), idx].argmax(1)
    errors = {"colour": 0, "shape": 0, "axis": 0, "direction": 0}  # what the best-fitting wrong prompt got wrong
    for n in (~correct).nonzero()[:, 0].tolist():
        (c, sh, d), (c2, sh2, d2) = parse_prompt(prompts[n]), parse_prompt(PROMPTS[int(per_prompt[n].argmax())])
        errors["colour"] += c != c2
        errors["shape"] += sh != sh2
        if d != d2:  # along the right axis but the other way, or along the other axis
            errors["direction" if axis_of(d) == axis_of(d2) else "axis"] += 1
    diversity = []
    for p in set(prompts):
        rows = [i for i, q in enumerate(prompts) if q == p]
        n = len(rows)
        if n > 1:
            expected = 121 * (1 - (120 / 121) ** n)
            diversity.append(len({int(start[i]) for i in rows}) / expected)
    return {"best_fit_psnr": best.mean().item(), "prompt_accuracy": correct.float().mean().item(),
            "diversity": sum(diversity) / len(diversity) if diversity else float("nan"),
            "steady_motion": shares["1 px"], "motion_steps": shares, "errors": errors,
            "per_sample_psnr": best, "per_sample_correct": correct}


def window_psnr(frames: torch.Tensor, prompts: list[str], window: int = 12) -> torch.Tensor:
    """Long videos: best-fit PSNR of each consecutive `window`-frame window, against the clips of the
    prompt's colour and shape moving either way along its axis (bounces flip the direction).
    frames uint8 (N, F, 16, 16, 3) -> (N, F // window)."""
    out = []
    for w in range(frames.shape[1] // window):
        psnr = psnr_to_all(frames[:, w * window:(w + 1) * window]).amax(2)  # (N, 48)
        best = []
        for n, p in enumerate(prompts):
            color, shape, direction = parse_prompt(p)
            best.append(max(psnr[n, PROMPTS.index(f"a {color} {shape} moving {d}")] for d in DIRECTIONS
                            if axis_of(d) == axis_of(direction)))
        out.append(torch.stack(best))
    return torch.stack(out, 1)


class ExactToyDenoiser(nn.Module):
    """The toy world's ideal teacher: the velocity E[eps - x0 | x_t, prompt] that flow matching
    (Eq. 2) converges to with unlimited capacity and training, in closed form -- the data is a finite
    set, the 121 clips X_m of each prompt (all 5808 for the unconditional prompt). Per frame
    x_t = (1 - s) X_m + s eps, so Bayes over the clips gives
        w_m = softmax_m( -sum_f ||x_t,f - (1 - s_f) X_m,f||^2 / (2 s_f^2) ),  x0_hat = sum_m w_m X_m,
    and v = (x_t - x0_hat) / s. Called like the DiT, model(x, t, text) -> velocity (t per frame); a
    prompt is recognised by its embedding, a row of `emb` (prompt -> (L, D_text), the toy prompts and
    the unconditional one). A diagnostic (Config.exact_teacher): with it as the teacher (ODE pairs,
    real score), what the students reach is what the distillation can do, the toy teacher's error
    taken out."""

    def __init__(self, emb: dict[str, torch.Tensor], uncond_prompt: str = ""):
        super().__init__()
        names = [p for p in PROMPTS + [uncond_prompt] if p in emb]
        if len(names) != len(PROMPTS) + 1:
            raise CausVidError("the exact toy teacher needs the embeddings of all 48 toy prompts and the "
                               f"unconditional prompt {uncond_prompt!r}")
        self.table = torch.stack([emb[p].flatten() for p in names]).double()  # (49, L * D_text)
        self._clips: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def clips(self, num_frames: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Every clip of the world, frame-major (F, 48 * 121, D) float64 with D = 3 H W, and the squared
        norms of its frames (F, 5808)."""
        if num_frames not in self._clips:
            X = to_model_space(all_clips(num_frames)).flatten(0, 1).flatten(2).double()  # (5808, F, D)
            X = X.transpose(0, 1).contiguous().to(device)
            self._clips[num_frames] = X, X.pow(2).sum(2)
        return self._clips[num_frames]

    def recognise(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L, D_text) -> (B,) prompt index into PROMPTS, len(PROMPTS) for the unconditional prompt."""
        d = torch.cdist(text.flatten(1).double().cpu(), self.table)  # (B, 49)
        best = d.min(1)
        if (best.values > 1e-3 * (1 + self.table.norm(dim=1).max())).any():
            raise CausVidError("the exact toy teacher was given a text embedding that is none of the toy prompts")
        return best.indices

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, **_) -> torch.Tensor:
        Fr, P, n = x.shape[1], len(PROMPTS), (MAX_POS + 1) ** 2  # n: clips per prompt
        X, norms = self.clips(Fr, x.device)  # (F, P n, D), (F, P n), prompt after prompt
        xf = x.double().flatten(2).transpose(0, 1)  # (F, B, D)
        s = (t.double().T / 1000).clamp(min=1e-4)[..., None]  # (F, B, 1)
        which = self.recognise(text).to(x.device)
        x0 = torch.empty_like(xf)
        for p in which.unique().tolist():
            rows = which == p
            m = slice(None) if p == P else slice(p * n, (p + 1) * n)  # unconditional: every clip of the world
            xr, sr, Xm = xf[:, rows], s[:, rows], X[:, m]  # (F, b, D), (F, b, 1), (F, M, D)
            d2 = xr.pow(2).sum(2, keepdim=True) - 2 * (1 - sr) * (xr @ Xm.transpose(1, 2)) \
                + (1 - sr) ** 2 * norms[:, None, m]  # (F, b, M): ||x_f - (1 - s_f) X_m,f||^2
            w = (-d2 / (2 * sr**2)).sum(0).softmax(1)  # (b, M)
            x0[:, rows] = w @ Xm
        v = (xf - x0) / s
        return v.transpose(0, 1).reshape(x.shape).to(x.dtype)


def teacher_role(teacher: nn.Module, text_encoder: TextEncoder, cfg: Config) -> nn.Module:
    """The model that plays the teacher in the ODE pairs and as DMD's real score: the bidirectional
    teacher itself, or with cfg.exact_teacher (toy world) the world's exact denoiser."""
    if not cfg.exact_teacher:
        return teacher
    if cfg.name != "tiny":
        raise CausVidError("exact_teacher exists for the toy world only (--tiny); drop --set exact_teacher=true")
    emb = embed_prompts(text_encoder, PROMPTS + [cfg.negative_prompt])
    return ExactToyDenoiser(emb, cfg.negative_prompt)  # its clips go to the device of the input


# ------------------------------------------------------------------------------------------------
# 12. Checkpoints and the Wan key mapping
# ------------------------------------------------------------------------------------------------

# Our parameter names are Wan2.1's original ones (the official Wan2.1-T2V-1.3B checkpoint loads with
# no renaming). diffusers' WanTransformer3DModel names them differently; this table maps ours to
# theirs, "{i}" standing for the block index. Note Wan's norm3 (the affine cross-attention norm) is
# diffusers' norm2, and Wan's norm2 (the FFN norm) is diffusers' norm3.
WAN_TO_DIFFUSERS = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "blocks.{i}.self_attn.q": "blocks.{i}.attn1.to_q",
    "blocks.{i}.self_attn.k": "blocks.{i}.attn1.to_k",
    "blocks.{i}.self_attn.v": "blocks.{i}.attn1.to_v",
    "blocks.{i}.self_attn.o": "blocks.{i}.attn1.to_out.0",
    "blocks.{i}.self_attn.norm_q": "blocks.{i}.attn1.norm_q",
    "blocks.{i}.self_attn.norm_k": "blocks.{i}.attn1.norm_k",
    "blocks.{i}.cross_attn.q": "blocks.{i}.attn2.to_q",
    "blocks.{i}.cross_attn.k": "blocks.{i}.attn2.to_k",
    "blocks.{i}.cross_attn.v": "blocks.{i}.attn2.to_v",
    "blocks.{i}.cross_attn.o": "blocks.{i}.attn2.to_out.0",
    "blocks.{i}.cross_attn.norm_q": "blocks.{i}.attn2.norm_q",
    "blocks.{i}.cross_attn.norm_k": "blocks.{i}.attn2.norm_k",
    "blocks.{i}.norm3": "blocks.{i}.norm2",
    "blocks.{i}.ffn.0": "blocks.{i}.ffn.net.0.proj",
    "blocks.{i}.ffn.2": "blocks.{i}.ffn.net.2",
    "blocks.{i}.modulation": "blocks.{i}.scale_shift_table",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}


def _diffusers_key(key: str) -> str:
    """Our (Wan) parameter name -> diffusers' name, through WAN_TO_DIFFUSERS."""
    m = re.match(r"blocks\.(\d+)\.(.*)", key)
    i, rest = (m.group(1), "blocks.{i}." + m.group(2)) if m else (None, key)
    module, _, param = rest.rpartition(".")
    for ours, theirs in ((rest, None), (module, param)):  # parameters with no suffix, then module.param
        if ours in WAN_TO_DIFFUSERS:
            name = WAN_TO_DIFFUSERS[ours].format(i=i)
            return name if theirs is None else f"{name}.{theirs}"
    raise KeyError(f"no diffusers name for parameter {key!r}")


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint"):
    """load_state_dict that names every missing, unexpected or mis-shaped key in one error."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CausVidError(f"{source} does not fit the model: missing {missing}, unexpected {unexpected}, "
                         f"shape mismatches {shapes}")
    model.load_state_dict(state)


def from_diffusers_state_dict(model: DiT, state: dict[str, torch.Tensor]) -> DiT:
    """Load a diffusers WanTransformer3DModel state dict into our DiT (strict)."""
    ours = {key: state[_diffusers_key(key)] for key in model.state_dict() if _diffusers_key(key) in state}
    unexpected = sorted(set(state) - {_diffusers_key(k) for k in model.state_dict()})
    if unexpected:
        raise CausVidError(f"diffusers state dict has keys our DiT does not: {unexpected}")
    load_state_dict_strict(model, ours, "diffusers state dict")
    return model


def save_checkpoint(path: str, tensors: dict[str, torch.Tensor], cfg: Config, **meta):
    """Weights as .safetensors, the config (and any JSON-able meta) in its header, so the file alone
    rebuilds its model. Written to a temporary file and renamed: a crash never leaves half a file."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    header = {"config": json.dumps(asdict(cfg)), **{k: json.dumps(v) for k, v in meta.items()}}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, tmp, metadata=header)  # clone: no shared storage
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, keep: Callable[[str], bool] = lambda key: True) -> tuple[dict[str, torch.Tensor], Config, dict]:
    """-> (tensors whose names pass `keep`, config, meta); the other tensors are never read.
    Never unpickles: safetensors holds only tensors and strings."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CausVidError(f"checkpoint {path!r} not found; check the path (train_ode.py / train_dmd.py write "
                           "runs/<config>/{teacher,ode,dmd}.safetensors)")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys() if keep(k)}
    except Exception as e:  # safetensors' own error types differ between versions
        raise CausVidError(f"{path!r} is not a readable .safetensors checkpoint (wrong format or truncated: "
                           f"{str(e).splitlines()[0][:80]}); pass a file written by these scripts") from None
    if "config" not in header:
        raise CausVidError(f"{path!r} is a safetensors file but not a CausVid checkpoint (no config in its header)")
    meta = {k: json.loads(v) for k, v in header.items() if k != "config"}
    return tensors, config_from_dict(json.loads(header["config"])), meta


def save_model(path: str, model: DiT, text_encoder: TextEncoder | None = None, **meta):
    """The DiT's weights, its role (causal or not) and config; with the tiny text encoder also its
    weights (prefix "text_encoder."), so the file alone rebuilds both. Wan's UMT5 stays in its own
    directory."""
    tensors = dict(model.state_dict())
    if text_encoder is not None and model.cfg.text_encoder == "tiny":
        tensors.update({f"text_encoder.{k}": v for k, v in text_encoder.encoder.state_dict().items()})
    save_checkpoint(path, tensors, model.cfg, causal=model.causal, **meta)


def check_preset(cfg: Config, expected: Config | None, path: str):
    """A checkpoint made with one preset cannot run under another."""
    if expected is not None and cfg.name != expected.name:
        raise CausVidError(f"{path!r} holds a {cfg.name!r} model but the preset asked for is {expected.name!r}; "
                           f"pass --config {cfg.name} (or --tiny), or a checkpoint of {expected.name!r}")


def load_model(path: str, causal: bool | None = None, device="cpu", expect: Config | None = None) -> DiT:
    """Rebuild a DiT from a checkpoint alone; causal=None keeps the role it was saved with.
    A directory is an official Wan2.1 release (either layout, see load_wan): the bidirectional
    teacher. expect: the preset the caller runs under; a checkpoint of another preset is refused."""
    if os.path.isdir(path):
        return load_wan(path, expect or get_config("wan2.1-t2v-1.3b"), bool(causal)).to(device)
    tensors, cfg, meta = load_checkpoint(path, keep=lambda k: not k.startswith("text_encoder."))
    check_preset(cfg, expect, path)
    model = DiT(cfg, causal=meta.get("causal", False) if causal is None else causal)
    load_state_dict_strict(model, tensors, path)
    return model.to(device)


def load_text_encoder(path: str) -> TextEncoder:
    """The text encoder that belongs to a checkpoint: the stored tiny UMT5, or UMT5 from the config's
    path. Reads only the text encoder's tensors, not the DiT's."""
    tensors, cfg, _ = load_checkpoint(path, keep=lambda k: k.startswith("text_encoder."))
    te = {k[len("text_encoder."):]: v for k, v in tensors.items()}
    if cfg.text_encoder == "tiny" and not te:
        raise CausVidError(f"{path!r} uses the tiny text encoder but does not contain its weights")
    return build_text_encoder(cfg, te or None)


def text_encoder_for(path: str, cfg: Config, dtype=torch.float32) -> TextEncoder:
    """The text encoder of a run: the tiny one stored in checkpoint `path`, or UMT5 from cfg.text_encoder
    (in `dtype`: bf16 on a GPU, as Wan ships UMT5-XXL)."""
    if cfg.text_encoder == "tiny":
        return load_text_encoder(path)
    if not cfg.text_encoder:
        raise CausVidError("no text encoder: pass --model-dir with a text_encoder/ inside (the diffusers layout), or "
                           "--text-encoder DIR (the original release's UMT5 .pth is in another format: use "
                           "Wan2.1-T2V-1.3B-Diffusers/text_encoder)")
    return load_umt5(cfg.text_encoder, cfg.text_len, dtype)


def read_prompts(path: str | None, cfg: Config) -> list[str]:
    """Training prompts: the toy world's 48, or one per line of a text file (required for Wan)."""
    if path is None:
        if cfg.name == "tiny":
            return list(PROMPTS)
        raise CausVidError("pass --prompts FILE (one prompt per line) to train on Wan")
    if not os.path.isfile(path):
        raise CausVidError(f"prompt file {path!r} not found")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise CausVidError(f"prompt file {path!r} holds no prompts; write one per line")
    return prompts


def read_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory: its one .safetensors file, or the shards its index lists."""
    from safetensors.torch import load_file

    names = os.listdir(path)
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if index:
        with open(os.path.join(path, index[0])) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in names if n.endswith(".safetensors"))
    if not files:
        raise CausVidError(f"no .safetensors weights in {path!r}")
    state = {}
    for name in files:
        if not os.path.isfile(os.path.join(path, name)):
            raise CausVidError(f"{path!r}: shard {name!r} listed in {index[0]!r} is missing; download it again")
        state.update(load_file(os.path.join(path, name)))
    return state


def wan_config(model_dir: str, base: Config) -> tuple[Config, str, str]:
    """-> (config, the DiT's directory, its layout). The DiT's shapes come from the directory's
    config.json, the rest (training, sampling) from `base`; text encoder and VAE paths are set to the
    diffusers layout's text_encoder/ and vae/ where they exist.
      original  (Wan2.1-T2V-1.3B):           config.json + diffusion_pytorch_model*.safetensors, Wan names
      diffusers (Wan2.1-T2V-1.3B-Diffusers): transformer/{config.json, *.safetensors[, index]}, text_encoder/,
                                             tokenizer/, vae/"""
    sub = os.path.join(model_dir, "transformer")
    layout, dit_dir = ("diffusers", sub) if os.path.isdir(sub) else ("original", model_dir)
    try:
        with open(os.path.join(dit_dir, "config.json")) as f:
            c = json.load(f)
    except OSError:
        raise CausVidError(f"{model_dir!r} is not a Wan2.1 directory: no config.json in it or in transformer/") from None
    if layout == "diffusers":
        shapes = dict(dim=c["num_attention_heads"] * c["attention_head_dim"], num_heads=c["num_attention_heads"],
                      channels=c["in_channels"], patch_size=tuple(c["patch_size"]), ffn_dim=c["ffn_dim"],
                      num_layers=c["num_layers"], text_dim=c["text_dim"], freq_dim=c["freq_dim"], eps=c["eps"])
    else:
        shapes = dict(dim=c["dim"], num_heads=c["num_heads"], channels=c["in_dim"], ffn_dim=c["ffn_dim"],
                      num_layers=c["num_layers"], text_dim=c.get("text_dim", 4096), freq_dim=c["freq_dim"],
                      patch_size=tuple(c.get("patch_size", (1, 2, 2))), eps=c["eps"])
    parts = {k: os.path.abspath(os.path.join(model_dir, k)) for k in ("text_encoder", "vae")
             if os.path.isdir(os.path.join(model_dir, k))}
    return Config(**{**asdict(base), **shapes, **parts}), dit_dir, layout


def load_wan(model_dir: str, base: Config, causal: bool = False) -> DiT:
    """An official Wan2.1 DiT from a local directory (either layout, see wan_config), strictly: a
    missing or unexpected key is an error that lists them."""
    cfg, dit_dir, layout = wan_config(model_dir, base)
    model = DiT(cfg, causal)
    state = read_safetensors_dir(dit_dir)
    if layout == "diffusers":
        return from_diffusers_state_dict(model, state)
    load_state_dict_strict(model, state, model_dir)
    return model


class WanVAE:
    """diffusers' AutoencoderKLWan with Wan's per-channel latent normalisation, video in (B, F, C, H, W)
    layout. 4x temporal compression (1 + 4k frames <-> 1 + k latents), 8x spatial, 16 channels.
    decode_stream decodes latent chunks as they arrive, keeping the causal decoder's cache between
    chunks, so the result equals decoding the whole video at once (this reuses diffusers' internal
    per-frame decode loop, AutoencoderKLWan._decode, with its cache kept)."""

    def __init__(self, path_or_vae, device="cpu", dtype=torch.float32):
        """path_or_vae: a diffusers AutoencoderKLWan directory (loaded in `dtype`), or such a module
        already built (kept in its own dtype)."""
        from diffusers import AutoencoderKLWan

        vae = path_or_vae
        if not isinstance(vae, nn.Module):
            if not os.path.isdir(vae):
                raise CausVidError(f"VAE directory {vae!r} not found; pass Wan2.1-T2V-1.3B-Diffusers/vae (--vae or --model-dir)")
            vae = AutoencoderKLWan.from_pretrained(vae, torch_dtype=dtype)
        self.vae = vae.to(device).eval().requires_grad_(False)
        c = self.vae.config
        self.mean = torch.tensor(c.latents_mean, device=device, dtype=dtype).view(1, 1, -1, 1, 1)
        self.std = torch.tensor(c.latents_std, device=device, dtype=dtype).view(1, 1, -1, 1, 1)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """pixels in [-1, 1] (B, 1 + 4k, 3, H, W) -> normalised latents (B, 1 + k, C, H / 8, W / 8)."""
        mu = self.vae.encode(rearrange(video, "b f c h w -> b c f h w")).latent_dist.mode()
        return (rearrange(mu, "b c f h w -> b f c h w") - self.mean) / self.std

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """normalised latents (B, 1 + k, C, h, w) -> pixels in [-1, 1] (B, 1 + 4k, 3, 8 h, 8 w)."""
        x = self.vae.decode(rearrange(z * self.std + self.mean, "b f c h w -> b c f h w")).sample
        return rearrange(x, "b c f h w -> b f c h w")

    @torch.no_grad()
    def decode_stream(self, chunks) -> Iterator[torch.Tensor]:
        """Latent chunks (B, K, C, h, w) -> their pixels, chunk by chunk (the first latent frame gives one
        pixel frame, every later one four)."""
        vae, first = self.vae, True
        vae.clear_cache()
        for z in chunks:
            x = vae.post_quant_conv(rearrange(z * self.std + self.mean, "b f c h w -> b c f h w"))
            out = []
            for i in range(x.shape[2]):
                vae._conv_idx = [0]
                kw = {"first_chunk": True} if first else {}
                out.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, **kw))
                first = False
            yield rearrange(torch.cat(out, 2).clamp(-1, 1), "b c f h w -> b f c h w")
        vae.clear_cache()


# ------------------------------------------------------------------------------------------------
# 13. Training and output utilities shared by the scripts
# ------------------------------------------------------------------------------------------------


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CausVidError(f"--device {name} was given but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def text_dtype(device: torch.device) -> torch.dtype:
    """UMT5 runs in bf16 on a GPU (as Wan ships it), fp32 on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device, training: bool = False):
    """bf16 autocast on CUDA. On a CPU only for training steps, and only where the CPU computes in
    bf16 natively (AVX512-BF16 or AMX; about 15-20% faster per tiny teacher step on the 2-core
    development machine); sampling on a CPU, and training on other CPUs, stays fp32."""
    from contextlib import nullcontext

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.autocast("cpu", dtype=torch.bfloat16) if training and native else nullcontext()


class EMA:
    """Exponential moving average of a model's parameters (the weights the tiny teacher is sampled with)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module):
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v, 1 - self.decay) if v.dtype.is_floating_point else self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict):
        for k, v in state.items():
            self.shadow[k].copy_(v)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class NonFiniteError(CausVidError):
    """A loss or gradient that is NaN or inf; the step that produced it was not applied."""


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params, clip: float, lr: float | None = None) -> float:
    """backward, clip, step; returns the gradient norm before clipping. A non-finite loss or gradient
    raises NonFiniteError *before* the update, so the weights stay the last good ones."""
    if not torch.isfinite(loss):
        raise NonFiniteError(f"the loss is {loss.item()}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    if not torch.isfinite(norm):
        raise NonFiniteError(f"the gradient norm is {norm.item()} (loss {loss.item():.4g})")
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr
    opt.step()
    return norm.item()


def _pack(obj, name: str, tensors: dict):
    """Nested dicts/lists of tensors and JSON values -> a JSON spec; the tensors go to `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj
        return {"tensor": name}
    if isinstance(obj, dict):
        return {"dict": [[k, _pack(v, f"{name}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"list": [_pack(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]}
    return {"value": obj}


def _unpack(spec: dict, tensors: dict):
    if "tensor" in spec:
        return tensors[spec["tensor"]]
    if "dict" in spec:
        return {k: _unpack(v, tensors) for k, v in spec["dict"]}
    if "list" in spec:
        return [_unpack(v, tensors) for v in spec["list"]]
    return spec["value"]


class TrainLoop:
    """What every training loop here shares so that no night of training is lost:

      with cv.TrainLoop(path, cfg, steps, {"model": model, "opt": opt, "data": g}, resume) as loop:
          for step in loop:        # step = 0, 1, ... (from the saved step when resuming)
              ...one training step...

    * the state -- anything with state_dict()/load_state_dict() (models, optimizers, EMA) and
      torch.Generators, plus torch's global RNG and the step -- is written atomically to `path`
      every `save_every` steps and on Ctrl-C (SIGINT) after the step in progress ends, which then
      exits with code 130; a second Ctrl-C stops at once;
    * resume=True continues from `path`: the following steps' losses are those of a run never stopped;
    * a NonFiniteError (NaN/inf loss or gradient; optimizer_step applies nothing then) stops training
      with one line naming the step; the weights are still the last good ones, and are saved;
    * when all steps are done the state file is deleted (the stage's checkpoint replaces it)."""

    def __init__(self, path: str, cfg: Config, total: int, state: dict, resume: bool = False,
                 save_every: int = 500, desc: str = "training"):
        if "rng" in state:
            raise ValueError('"rng" is the name of the global RNG state; call yours something else')
        self.path, self.cfg, self.total, self.state = path, cfg, total, state
        self.save_every, self.desc, self.step, self._stop = save_every, desc, 0, False
        if resume and os.path.exists(path):
            self._load()
            print(f"resuming {desc} from {path} at step {self.step}")
        elif resume:
            print(f"--resume: no saved state at {path}; {desc} starts from step 0")

    def _save(self):
        tensors: dict[str, torch.Tensor] = {}
        rngs = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rngs["cuda"] = torch.cuda.get_rng_state_all()
        spec = {name: _pack(obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict(), name, tensors)
                for name, obj in self.state.items()}
        spec["rng"] = _pack(rngs, "rng", tensors)  # torch's global generators (noise, timesteps)
        save_checkpoint(self.path, tensors, self.cfg, step=self.step, state=spec)

    def _load(self):
        tensors, cfg, meta = load_checkpoint(self.path)
        if cfg != self.cfg:
            diff = {f.name: (getattr(cfg, f.name), getattr(self.cfg, f.name)) for f in fields(Config)
                    if getattr(cfg, f.name) != getattr(self.cfg, f.name)}
            raise CausVidError(f"{self.path!r} was saved with another config ({diff}, saved vs now); "
                               "resume with the same flags, or delete it to start over")
        spec = meta["state"]
        for name, obj in self.state.items():
            value = _unpack(spec[name], tensors)
            obj.set_state(value) if isinstance(obj, torch.Generator) else obj.load_state_dict(value)
        rngs = _unpack(spec["rng"], tensors)
        torch.set_rng_state(rngs["torch"])
        if "cuda" in rngs and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rngs["cuda"])
        self.step = meta["step"]

    def __enter__(self):
        def on_sigint(signum, frame):
            if self._stop:  # the second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop = True
            tqdm.write(f"Ctrl-C: stopping after step {self.step + 1}, saving {self.path} (Ctrl-C again to quit now)")

        self._old = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
        return self

    def __iter__(self):
        for step in tqdm(range(self.step, self.total), desc=self.desc, initial=self.step, total=self.total):
            yield step
            self.step = step + 1
            if self._stop:
                self._save()
                tqdm.write(f"interrupted: saved {self.path} at step {self.step}; continue with --resume")
                raise SystemExit(130)
            if self.step % self.save_every == 0 and self.step < self.total:
                self._save()

    def __exit__(self, kind, error, tb):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        if isinstance(error, NonFiniteError):
            self._save()
            raise NonFiniteError(f"{self.desc} stopped at step {self.step + 1}: {error}; nothing of that step "
                                 f"was applied and the last good state (after step {self.step}) is in {self.path} "
                                 "-- lower the learning rate or clip harder, and continue with --resume") from None
        if error is None and self.step >= self.total and os.path.exists(self.path):
            os.remove(self.path)
        return False


def write_video(path: str, frames: torch.Tensor, scale: int = 8, fps: int = 8, columns: int = 8):
    """uint8 (N, F, H, W, 3) -> one video (.gif or .mp4) of the N clips in a grid, each upscaled by
    nearest neighbour so 16x16 frames are visible. Written to a temporary name, then renamed."""
    import imageio.v2 as imageio

    N, Fr, H, W, _ = frames.shape
    cols = min(columns, N)
    rows = -(-N // cols)
    pad = torch.zeros(rows * cols - N, Fr, H, W, 3, dtype=torch.uint8)
    grid = torch.cat([frames, pad]).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    grid = F.pad(grid.permute(0, 1, 4, 2, 3), (1, 1, 1, 1), value=64).permute(0, 1, 3, 4, 2)  # grey borders
    grid = rearrange(grid, "(r c) f h w x -> f (r h) (c w) x", r=rows, c=cols).numpy()
    ext = os.path.splitext(path)[1]
    tmp = f"{path}.tmp{os.getpid()}{ext}"
    if ext == ".gif":
        imageio.mimsave(tmp, list(grid), duration=1000 / fps, loop=0)
    else:
        imageio.mimsave(tmp, list(grid), fps=fps, macro_block_size=1)
    os.replace(tmp, path)


def read_frames(path: str, height: int, width: int) -> torch.Tensor:
    """An image (png, jpg, ...), a video (mp4, gif) or a samples .npz of ours -> uint8 (N, F, H, W, 3),
    N = 1 except for an npz of several videos. RGBA loses its alpha; frames of another size are
    resized (with a message); other channel counts and bit depths are refused."""
    import imageio.v2 as imageio
    import numpy as np

    if not os.path.isfile(path):
        raise CausVidError(f"input {path!r} not found; check the path")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                arr = data["frames"]
        else:
            arr = np.stack(imageio.mimread(path, memtest=False))
    except Exception as e:
        raise CausVidError(f"cannot read {path!r} as an image, a video or a samples .npz "
                           f"({str(e).splitlines()[0][:80]})") from None
    if arr.dtype != np.uint8:
        raise CausVidError(f"{path!r} has {arr.dtype} pixels; give an 8-bit image or video")
    if arr.ndim == 3 or arr.shape[-1] not in (3, 4):  # grey frames (F, H, W), or odd channels
        channels = 1 if arr.ndim == 3 else arr.shape[-1]
        raise CausVidError(f"{path!r} has {channels} channel(s) per pixel; give an RGB (or RGBA) image or video")
    frames = torch.from_numpy(arr[..., :3].copy())
    frames = frames[None] if frames.ndim == 4 else frames  # (N, F, H, W, 3)
    if frames.shape[2:4] != (height, width):
        print(f"note: {path!r} is {frames.shape[3]}x{frames.shape[2]}, the model's frames are {width}x{height}: "
              "resized")
        x = frames.flatten(0, 1).permute(0, 3, 1, 2).float()
        shrink = x.shape[2] >= height and x.shape[3] >= width
        x = F.interpolate(x, size=(height, width), mode="area" if shrink else "nearest")
        frames = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).unflatten(0, frames.shape[:2])
    return frames


def add_common_args(p):
    """The flags every script shares."""
    p.add_argument("--tiny", action="store_true", help="the toy-world preset: runs on a CPU in minutes")
    p.add_argument("--config", choices=sorted(PRESETS), help="a named preset (--tiny is --config tiny)")
    p.add_argument("--out", help="run directory for checkpoints and samples (default: runs/<config>)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the preset's)")
    p.add_argument("--model-dir", help="Wan: the official Wan2.1-T2V-1.3B directory, either layout (DiT shapes, "
                                       "text_encoder/ and vae/ are taken from it)")
    p.add_argument("--text-encoder", help="Wan: a transformers UMT5 directory (tokenizer/ beside it), if not "
                                          "<model-dir>/text_encoder")
    p.add_argument("--vae", help="Wan: a diffusers AutoencoderKLWan directory, if not <model-dir>/vae")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set num_frames=9 --set student_step_indices=0,36,44")
    return p


def parse_overrides(items: list[str]) -> dict:
    """["num_frames=9", "student_step_indices=0,36,44"] -> typed Config overrides."""
    types = {f.name: type(getattr(Config(), f.name)) for f in fields(Config)}
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in types:
            raise CausVidError(f"--set {item!r}: expected KEY=VALUE with KEY one of the Config fields "
                               f"({', '.join(sorted(types))})")
        try:
            kind = types[key]
            if kind is bool and value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            out[key] = (tuple(int(v) for v in value.split(",")) if kind is tuple
                        else value.lower() in ("true", "1") if kind is bool else kind(value))
        except ValueError:
            raise CausVidError(f"--set {item!r}: {value!r} is not a valid {types[key].__name__}") from None
    return out


def add_training_args(p):
    """The flags both training scripts share: resumable state (see TrainLoop)."""
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from <out>/<stage>_state"
                                                         ".safetensors (models, optimizers, step, RNG)")
    p.add_argument("--save-every", type=int, default=500, help="steps between saves of the resumable state "
                                                               "(default: 500; Ctrl-C also saves)")
    return p


def run_cli(main: Callable):
    """The scripts' entry point: a CausVidError is printed as one line and exits with code 2."""
    try:
        main()
    except CausVidError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def resolve_common(args) -> tuple[Config, torch.device, str]:
    """-> (config, device, run directory), from the common flags."""
    if args.tiny and args.config not in (None, "tiny"):
        raise CausVidError(f"--tiny and --config {args.config} contradict each other; give one")
    name = "tiny" if args.tiny else args.config
    if name is None:
        raise CausVidError("choose a preset: --tiny (toy world, CPU) or --config wan2.1-t2v-1.3b")
    overrides = {**({"batch_size": args.batch_size} if args.batch_size else {}), **parse_overrides(args.set)}
    cfg = get_config(name, **overrides)
    if args.model_dir:
        cfg = replace(wan_config(args.model_dir, cfg)[0], **overrides)
    if args.text_encoder or args.vae:
        cfg = replace(cfg, **({"text_encoder": os.path.abspath(args.text_encoder)} if args.text_encoder else {}),
                      **({"vae": os.path.abspath(args.vae)} if args.vae else {}))
    out = args.out or os.path.join("runs", name)
    device = pick_device(args.device)
    try:  # fail now, not after an hour of training
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f".write_test{os.getpid()}"), "w"):
            pass
        os.remove(os.path.join(out, f".write_test{os.getpid()}"))
    except OSError as e:
        raise CausVidError(f"cannot write to --out {out!r} ({e.strerror}); pass a directory you can write to") from None
    return cfg, device, out


def embed_prompts(text_encoder: TextEncoder, prompts: list[str], batch: int = 64) -> dict[str, torch.Tensor]:
    """Encode a fixed set of prompts once: prompt -> (L, D_text)."""
    unique = list(dict.fromkeys(prompts))
    out = {}
    for i in range(0, len(unique), batch):
        out.update(zip(unique[i:i + batch], text_encoder(unique[i:i + batch]).float().cpu()))
    return out
