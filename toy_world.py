"""Moving Shapes, the toy world behind --tiny (shared/toy_world.md): a renderer with exact dynamics,
the data, the scores, the world's exact denoiser, the tiny text encoder, and ToyWorld, the world
as the scripts see it (wan.WanWorld is the same interface for Wan2.1).

16x16 RGB clips of one coloured square or circle moving 1 px per frame and bouncing off the walls,
prompted as "a red circle moving left" (48 prompts). The dynamics are exact, so a generated clip can
be scored against every clip its prompt admits.
"""

import functools
import json
import math
import os

import torch
import torch.nn as nn

import causvid as cv
from wan import TextEncoder

COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
SHAPES = ("square", "circle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PROMPTS = [f"a {c} {s} moving {d}" for c in COLORS for s in SHAPES for d in DIRECTIONS]  # 48
FRAME, BOX, MAX_POS = 16, 6, 10  # frame side, object box side, largest top-left coordinate


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """ "a red circle moving left" -> ("red", "circle", "left")."""
    words = prompt.split()
    if (
        len(words) != 5
        or words[0] != "a"
        or words[3] != "moving"
        or words[1] not in COLORS
        or words[2] not in SHAPES
        or words[4] not in DIRECTIONS
    ):
        raise ValueError(
            f"{prompt!r} is not a toy prompt; "
            "expected 'a {color} {shape} moving {direction}' "
            f"with color in {list(COLORS)}, shape in {list(SHAPES)}, "
            f"direction in {list(DIRECTIONS)}"
        )
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
    """One clip, uint8 (F, 16, 16, 3), black background,
    box top-left at column x, row y in frame 0."""
    color, shape, direction = parse_prompt(prompt)
    mask, rgb = shape_mask(shape), torch.tensor(COLORS[color], dtype=torch.uint8)
    clip = torch.zeros(num_frames, FRAME, FRAME, 3, dtype=torch.uint8)
    for f, (px, py) in enumerate(trajectory(x, y, direction, num_frames)):
        clip[f, py : py + BOX, px : px + BOX][mask] = rgb
    return clip


@functools.cache
def all_clips(num_frames: int) -> torch.Tensor:
    """Every clip of the world: uint8 (48 prompts, 121 starts, F, 16, 16, 3),
    start index = y * 11 + x."""
    starts = [(x, y) for y in range(MAX_POS + 1) for x in range(MAX_POS + 1)]
    lit = {
        (sh, d): torch.stack(
            [render(f"a red {sh} moving {d}", x, y, num_frames)[..., :1] > 0 for x, y in starts]
        )
        for sh in SHAPES
        for d in DIRECTIONS
    }  # colour only paints: render each motion once
    return torch.stack(
        [
            lit[sh, d] * torch.tensor(COLORS[c], dtype=torch.uint8)
            for c, sh, d in map(parse_prompt, PROMPTS)
        ]
    )


def to_model_space(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., F, H, W, 3) -> float (..., F, 3, H, W) in [-1, 1]:
    the toy world's identity "VAE"."""
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
    mse = torch.stack(
        [torch.cdist(x, ref.flatten(1).double()) ** 2 for ref in all_clips(frames.shape[1])], 1
    )
    return 10 * torch.log10(255.0**2 / (mse / x.shape[1]).clamp_min(1e-10))


def axis_of(direction: str) -> int:
    """0 for a horizontal direction (left, right), 1 for a vertical one (up, down)."""
    return 0 if DIRECTIONS[direction][0] else 1


def object_positions(frames: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame, the top-left corner at which the prompt's object (its colour and shape, alone on
    black) fits the frame best, and whether it fits better than an empty frame (the object is
    there). frames uint8 (N, F, 16, 16, 3) -> corners long (N, F, 2) as (x, y), seen bool (N, F)."""
    corners = torch.tensor([(x, y) for y in range(MAX_POS + 1) for x in range(MAX_POS + 1)])
    # (48, 121, P): each prompt's object at every corner
    refs = all_clips(1)[:, :, 0].flatten(2).double()
    pos, seen = [], []
    for clip, p in zip(frames.flatten(2).double(), prompts):
        mse = torch.cdist(clip, refs[PROMPTS.index(p)]) ** 2  # (F, 121)
        pos.append(corners[mse.argmin(1)])
        seen.append(mse.amin(1) < (clip**2).sum(1))
    return torch.stack(pos), torch.stack(seen)


def motion_steps(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per frame step, how many px the object moves along the prompt's axis (object_positions), or
    -1 where the step is not along the axis: it moves across it too, or the object is missing.
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
    motion_steps: the shares that pause, move 1 px, jump 2+ px, or leave the axis;
    first_chunk_pause: the pause share of the three steps from the first chunk's frames, where a
    causal student pauses), and the kinds of error of the wrongly fitted samples (colour, shape,
    motion axis, direction on the axis); breakdown and clean_frame_psnr: where the best-fit PSNR
    goes (the comment below)."""
    psnr = psnr_to_all(frames)  # (N, 48, 121)
    steps = motion_steps(frames, prompts)
    shares = {
        name: hit.double().mean().item()
        for name, hit in [
            ("pause", steps == 0),
            ("1 px", steps == 1),
            ("2+ px", steps >= 2),
            ("off axis / missing", steps < 0),
        ]
    }
    idx = torch.tensor([PROMPTS.index(p) for p in prompts])
    per_prompt = psnr.amax(2)  # (N, 48)
    best = per_prompt[torch.arange(len(prompts)), idx]
    correct = best >= per_prompt.amax(1)
    start = psnr[torch.arange(len(prompts)), idx].argmax(1)
    errors = {
        "colour": 0,
        "shape": 0,
        "axis": 0,
        "direction": 0,
    }  # what the best-fitting wrong prompt got wrong
    for n in (~correct).nonzero()[:, 0].tolist():
        (c, sh, d), (c2, sh2, d2) = (
            parse_prompt(prompts[n]),
            parse_prompt(PROMPTS[int(per_prompt[n].argmax())]),
        )
        errors["colour"] += c != c2
        errors["shape"] += sh != sh2
        if d != d2:  # along the right axis but the other way, or along the other axis
            errors["direction" if axis_of(d) == axis_of(d2) else "axis"] += 1
    # where the PSNR goes (docs/experiments.md): the share and mean best-fit PSNR of the samples
    # with the wrong prompt, with a first-chunk pause, and clean; and the clean ones' PSNR frame by
    # frame against their best fit
    first_pauses = steps[:, :3] == 0  # frame steps 0-1, 1-2, 2-3: the first chunk's frames
    paused = correct & first_pauses.any(1)
    groups = {"wrong prompt": ~correct, "first-chunk pause": paused, "clean": correct & ~paused}
    breakdown = {
        k: (m.double().mean().item(), best[m].mean().item() if m.any() else math.nan)
        for k, m in groups.items()
    }
    ref = all_clips(frames.shape[1])[idx, start].double()  # (N, F, 16, 16, 3)
    mse = ((frames.double() - ref) ** 2).flatten(2).mean(2)  # (N, F)
    clean_frames = (10 * torch.log10(255.0**2 / mse.clamp_min(1e-10)))[groups["clean"]].mean(
        0
    )  # averaged as best is
    diversity = []
    for p in set(prompts):
        rows = [i for i, q in enumerate(prompts) if q == p]
        n = len(rows)
        if n > 1:
            expected = 121 * (1 - (120 / 121) ** n)
            diversity.append(len({int(start[i]) for i in rows}) / expected)
    return {
        "best_fit_psnr": best.mean().item(),
        "prompt_accuracy": correct.float().mean().item(),
        "first_chunk_pause": first_pauses.double().mean().item(),
        "diversity": sum(diversity) / len(diversity) if diversity else float("nan"),
        "steady_motion": shares["1 px"],
        "motion_steps": shares,
        "errors": errors,
        "per_sample_psnr": best,
        "per_sample_correct": correct,
        "breakdown": breakdown,
        "clean_frame_psnr": clean_frames,
    }


def window_psnr(frames: torch.Tensor, prompts: list[str], window: int = 12) -> torch.Tensor:
    """Long videos: best-fit PSNR of each consecutive `window`-frame window, against the clips of
    the prompt's colour and shape moving either way along its axis (bounces flip the direction).
    frames uint8 (N, F, 16, 16, 3) -> (N, F // window)."""
    out = []
    for w in range(frames.shape[1] // window):
        psnr = psnr_to_all(frames[:, w * window : (w + 1) * window]).amax(2)  # (N, 48)
        best = []
        for n, p in enumerate(prompts):
            color, shape, direction = parse_prompt(p)
            best.append(
                max(
                    psnr[n, PROMPTS.index(f"a {color} {shape} moving {d}")]
                    for d in DIRECTIONS
                    if axis_of(d) == axis_of(direction)
                )
            )
        out.append(torch.stack(best))
    return torch.stack(out, 1)


def print_scores(frames: torch.Tensor, prompts: list[str], length: int, several: bool) -> dict:
    """The toy world's scores of the first `length` frames, and per window for longer videos."""
    s = score_toy(frames[:, :length], prompts)
    diversity = f"{s['diversity']:.2f}" if several else "n/a (one sample per prompt)"
    print(
        f"toy-world score (first {length} frames): best-fit PSNR {s['best_fit_psnr']:.2f} dB | "
        f"prompt accuracy {100 * s['prompt_accuracy']:.1f}% | diversity {diversity} | "
        f"steady 1-px motion {100 * s['steady_motion']:.1f}% of frame steps"
    )
    print(
        "frame steps along the prompt's axis: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in s["motion_steps"].items())
        + f" (pauses in the first chunk's steps: {100 * s['first_chunk_pause']:.1f}%)"
    )
    if not all(s["per_sample_correct"]):
        print(
            f"wrong prompt fits best for {int((~s['per_sample_correct']).sum())} "
            f"of {len(prompts)}; they got wrong: "
            + ", ".join(f"{k} {v}" for k, v in s["errors"].items())
        )
    print(
        "by sample: "
        + " | ".join(
            f"{k} {100 * share:.1f}% at {psnr:.2f} dB"
            for k, (share, psnr) in s["breakdown"].items()
        )
        + "; the clean ones frame by frame: "
        + " ".join(f"{v:.1f}" for v in s["clean_frame_psnr"].tolist())
        + " dB"
    )
    if frames.shape[1] > length:
        s["window_psnr"] = window_psnr(frames, prompts, length)
        print(
            "per-window best-fit PSNR: "
            + " ".join(f"{v:.1f}" for v in s["window_psnr"].mean(0).tolist())
        )
    return s


class ExactToyDenoiser(nn.Module):
    """The toy world's ideal teacher: the velocity E[eps - x0 | x_t, prompt] that flow matching
    (Eq. 2) converges to with unlimited capacity and training, in closed form -- the data is a
    finite set, the 121 clips X_m of each prompt (all 5808 for the unconditional prompt). Per frame
    x_t = (1 - s) X_m + s eps, so Bayes over the clips gives
        w_m = softmax_m( -sum_f ||x_t,f - (1 - s_f) X_m,f||^2 / (2 s_f^2) ),
        x0_hat = sum_m w_m X_m,
    and v = (x_t - x0_hat) / s. Called like the DiT, model(x, t, text) -> velocity (t per frame); a
    prompt is recognised by its embedding, a row of `emb` (prompt -> (L, D_text), the toy prompts
    and the unconditional one). A diagnostic (--exact-teacher): with it as the teacher (ODE pairs,
    real score), what the students reach is what the distillation can do, the toy teacher's error
    taken out."""

    def __init__(self, emb: dict[str, torch.Tensor], uncond_prompt: str = ""):
        super().__init__()
        names = [p for p in PROMPTS + [uncond_prompt] if p in emb]
        if len(names) != len(PROMPTS) + 1:
            raise cv.CausVidError(
                "the exact toy teacher needs the embeddings of all 48 toy prompts and the "
                f"unconditional prompt {uncond_prompt!r}"
            )
        self.table = torch.stack([emb[p].flatten() for p in names]).double()  # (49, L * D_text)
        self._clips: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def clips(self, num_frames: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Every clip of the world, frame-major (F, 48 * 121, D) float64 with D = 3 H W, and the
        squared norms of its frames (F, 5808)."""
        if num_frames not in self._clips:
            # (5808, F, D)
            X = to_model_space(all_clips(num_frames)).flatten(0, 1).flatten(2).double()
            X = X.transpose(0, 1).contiguous().to(device)
            self._clips[num_frames] = X, X.pow(2).sum(2)
        return self._clips[num_frames]

    def recognise(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L, D_text) -> (B,) prompt index into PROMPTS,
        len(PROMPTS) for the unconditional prompt."""
        d = torch.cdist(text.flatten(1).double().cpu(), self.table)  # (B, 49)
        best = d.min(1)
        if (best.values > 1e-3 * (1 + self.table.norm(dim=1).max())).any():
            raise cv.CausVidError(
                "the exact toy teacher was given a text embedding that is none of the toy prompts"
            )
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
            # unconditional: every clip of the world
            m = slice(None) if p == P else slice(p * n, (p + 1) * n)
            xr, sr, Xm = xf[:, rows], s[:, rows], X[:, m]  # (F, b, D), (F, b, 1), (F, M, D)
            d2 = (
                xr.pow(2).sum(2, keepdim=True)
                - 2 * (1 - sr) * (xr @ Xm.transpose(1, 2))
                + (1 - sr) ** 2 * norms[:, None, m]
            )  # (F, b, M): ||x_f - (1 - s_f) X_m,f||^2
            w = (-d2 / (2 * sr**2)).sum(0).softmax(1)  # (b, M)
            x0[:, rows] = w @ Xm
        v = (xf - x0) / s
        return v.transpose(0, 1).reshape(x.shape).to(x.dtype)


def tiny_text_encoder(cfg: cv.Config, state_dict: dict | None = None, seed: int = 0) -> TextEncoder:
    """The toy world's text encoder: a randomly initialised (seeded) 2-layer UMT5 over the
    file-free ByT5 byte tokenizer, frozen; its weights are stored with the teacher checkpoint."""
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    umt5 = UMT5Config(
        vocab_size=384,
        d_model=cfg.text_dim,
        d_kv=16,
        d_ff=2 * cfg.text_dim,
        num_layers=2,
        num_heads=cfg.text_dim // 16,
        relative_attention_num_buckets=32,
        dropout_rate=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = UMT5EncoderModel(umt5)
    if state_dict is not None:
        encoder.load_state_dict(state_dict)
    return TextEncoder(ByT5Tokenizer(), encoder, cfg.text_len)


# ------------------------------------------------------------------------------------------------
# The toy world as the scripts see it
# ------------------------------------------------------------------------------------------------

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def read_text_encoder(checkpoint: str) -> TextEncoder:
    """The tiny text encoder stored in a checkpoint beside its DiT (tensors "text_encoder.*"; the
    file was written by training.save_model and read once already by the DiT's loader)."""
    from safetensors import safe_open

    with safe_open(checkpoint, framework="pt") as f:
        cfg = cv.config_from_dict(json.loads(f.metadata()["config"]))
        prefix = "text_encoder."
        state = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    if not state:
        raise cv.CausVidError(
            f"{checkpoint!r} uses the tiny text encoder but does not contain its weights"
        )
    return tiny_text_encoder(cfg, state)


class ToyWorld:
    """Moving Shapes as the scripts see it. wan.WanWorld has the same members, so no script asks
    which world it runs in:
      prompts and text      prompts, preview_prompts, text_encoder(), saved_text_encoder(),
                            exact_teacher()
      frames and the DiT    pixel_size, check_pixels(), pixel_frames(), latent_frames(), encode(),
                            encode_stream(), decode_stream(), fork()  (here the DiT works on the
                            pixels)
      videos to train on    clips (flow-matching pre-training), training_videos() (DMD's data)
      a scorer              score()
      sizes and weights     sampling_batch, pairs_batch, frozen_dtype, pretrained_teacher,
                            pretrained_causal_teacher, pretrained_student"""

    name = "the toy world"
    prompts = PROMPTS  # what the scripts train on and sample by default
    preview_prompts = PROMPTS[::6]  # train_dmd.py's progress GIFs
    sampling_batch = 64  # videos sampled at once
    pairs_batch = 64  # ODE pairs made at once (a shard)
    frozen_dtype = torch.float32  # the frozen teacher's weights in DMD
    pretrained_teacher = os.path.join(WEIGHTS, "toy_teacher.safetensors")  # weights/README.md
    pretrained_causal_teacher = os.path.join(WEIGHTS, "toy_causal_teacher.safetensors")
    pretrained_student = os.path.join(WEIGHTS, "toy_student.safetensors")  # the demo's default

    def __init__(self, cfg: cv.Config, device="cpu"):
        self.cfg = cfg
        self.device = device
        self.pixel_size = (cfg.height, cfg.width)

    # prompts and text

    def text_encoder(self, checkpoint: str | None = None) -> TextEncoder:
        """The tiny UMT5 kept in `checkpoint`, or (None) a fresh one for a new teacher."""
        if checkpoint is None:
            return tiny_text_encoder(self.cfg).to(self.device)
        return read_text_encoder(checkpoint).to(self.device)

    def saved_text_encoder(self, text_encoder: TextEncoder) -> TextEncoder:
        """What a checkpoint keeps of the text encoder: the tiny one itself."""
        return text_encoder

    def exact_teacher(self, text_encoder: TextEncoder) -> nn.Module:
        """The world's exact denoiser in the teacher's place (--exact-teacher)."""
        negative = self.cfg.negative_prompt
        return ExactToyDenoiser(text_encoder.embed(PROMPTS + [negative]), negative)

    # frames and the DiT's space: the DiT works on the pixels themselves, in [-1, 1]

    def fork(self) -> "ToyWorld":
        """The same world for one more stream made at once (it keeps no state: itself)."""
        return self

    def check_pixels(self):
        """Nothing to check: the frames are the DiT's own."""

    def pixel_frames(self, latent_frames: int) -> int:
        return latent_frames

    def latent_frames(self, pixel_frames: int) -> int:
        return pixel_frames

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (B, F, H, W, 3) -> the DiT's space (B, F, 3, H, W)."""
        return to_model_space(frames).to(self.device)

    def encode_stream(self, pieces, chunk: int):
        """uint8 pixels arriving in pieces of any length -> the DiT's chunks of `chunk` frames."""
        buffer = None
        for piece in pieces:
            x = to_model_space(piece).to(self.device)
            buffer = x if buffer is None else torch.cat([buffer, x], 1)
            while buffer.shape[1] >= chunk:
                yield buffer[:, :chunk]
                buffer = buffer[:, chunk:]

    def decode_stream(self, chunks):
        """The DiT's chunks -> uint8 pixels (B, K, H, W, 3) on the CPU, chunk by chunk."""
        for x in chunks:
            yield to_uint8(x)

    # videos to train on

    def clips(self, batch_size: int, rng: torch.Generator):
        """Rendered clips and their prompts: ((B, F, 3, H, W) in [-1, 1], B prompts)."""
        return toy_batch(batch_size, self.cfg.num_frames, rng)

    def training_videos(self, pairs=None):
        """Alg. 1 line 4's videos: rendered clips. -> (draw(rng) -> (x0, prompts), every prompt)."""
        return (lambda rng: self.clips(self.cfg.batch_size, rng)), PROMPTS

    # a scorer

    def score(self, frames: torch.Tensor, prompts: list[str], several: bool, quiet=False) -> dict:
        """The toy-world scores of uint8 frames (N, F, H, W, 3), printed unless quiet (the
        printout says whether diversity means anything: several samples per prompt)."""
        if quiet:
            return score_toy(frames[:, : self.cfg.num_frames], prompts)
        return print_scores(frames, prompts, self.cfg.num_frames, several)
