"""What the scripts share and the method does not need: devices, checkpoints, prompts, the one
sampling front end, video files and the command line (training.py: what only training needs).
Nothing here is CausVid; causvid.py is.
"""

import contextlib
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, fields, replace
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import causvid as cv
import toy_world as toy
import wan

# ------------------------------------------------------------------------------------------------
# Devices and precision
# ------------------------------------------------------------------------------------------------


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise cv.CausVidError(f"--device {name} was given but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on a CPU: UMT5 (Wan ships it in bf16), the VAE, the DiT's inference weights."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device, training: bool = False):
    """bf16 autocast on CUDA. On a CPU only for training steps, and only where the CPU computes in bf16
    natively (AVX512-BF16 or AMX: about 15-20% faster per toy teacher step); sampling on a CPU, training on
    other CPUs, and all of it with CAUSVID_CPU_FP32=1 (the same numbers on every CPU) stay fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    native = os.environ.get("CAUSVID_CPU_FP32") != "1" and (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return torch.autocast("cpu", dtype=torch.bfloat16) if training and native else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# Checkpoints: .safetensors with the config in the header; never unpickled
# ------------------------------------------------------------------------------------------------


def save_checkpoint(path: str, tensors: dict[str, torch.Tensor], cfg: cv.Config, **meta):
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


def load_checkpoint(path: str, keep: Callable[[str], bool] = lambda key: True) -> tuple[dict, cv.Config, dict]:
    """-> (tensors whose names pass `keep`, config, meta); the other tensors are never read."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise cv.CausVidError(f"checkpoint {path!r} not found; check the path (train_ode.py / train_dmd.py write "
                              "runs/<config>/{teacher,ode,dmd}.safetensors)")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys() if keep(k)}
    except Exception as e:  # safetensors' own error types differ between versions
        raise cv.CausVidError(f"{path!r} is not a readable .safetensors checkpoint (wrong format or truncated: "
                              f"{str(e).splitlines()[0][:80]}); pass a file written by these scripts") from None
    if "config" not in header:
        raise cv.CausVidError(f"{path!r} is a safetensors file but not a CausVid checkpoint (no config in its header)")
    meta = {k: json.loads(v) for k, v in header.items() if k != "config"}
    return tensors, cv.config_from_dict(json.loads(header["config"])), meta


def check_preset(cfg: cv.Config, expected: cv.Config | None, path: str):
    """A checkpoint made with one preset cannot run under another."""
    if expected is not None and cfg.name != expected.name:
        raise cv.CausVidError(f"{path!r} holds a {cfg.name!r} model but the preset asked for is {expected.name!r}; "
                              f"pass --config {cfg.name} (or --tiny), or a checkpoint of {expected.name!r}")


def load_model(path: str, causal: bool | None = None, device="cpu", expect: cv.Config | None = None) -> cv.DiT:
    """Rebuild a DiT from a checkpoint alone; causal=None keeps the role it was saved with. A directory
    is an official Wan2.1 release (the bidirectional teacher). expect: the preset the caller runs
    under; a checkpoint of another preset is refused."""
    if os.path.isdir(path):
        return wan.load_wan(path, expect or cv.get_config("wan2.1-t2v-1.3b"), bool(causal)).to(device)
    tensors, cfg, meta = load_checkpoint(path, keep=lambda k: not k.startswith("text_encoder."))
    check_preset(cfg, expect, path)
    model = cv.DiT(cfg, causal=meta.get("causal", False) if causal is None else causal)
    wan.load_state_dict_strict(model, tensors, path)
    return model.to(device)


def load_text_encoder(path: str) -> wan.TextEncoder:
    """The tiny text encoder stored in a checkpoint (only its tensors are read)."""
    tensors, cfg, _ = load_checkpoint(path, keep=lambda k: k.startswith("text_encoder."))
    if not tensors:
        raise cv.CausVidError(f"{path!r} uses the tiny text encoder but does not contain its weights")
    return toy.tiny_text_encoder(cfg, {k[len("text_encoder."):]: v for k, v in tensors.items()})


def text_encoder_for(path: str, cfg: cv.Config, device) -> wan.TextEncoder:
    """The text encoder of a run: the tiny one stored in checkpoint `path`, or UMT5 from cfg.text_encoder."""
    if cfg.text_encoder == "tiny":
        return load_text_encoder(path).to(device)
    return wan.load_umt5(cfg.text_encoder, cfg.text_len, inference_dtype(device)).to(device)


def real_score(teacher: nn.Module, text_encoder: wan.TextEncoder, cfg: cv.Config, exact: bool) -> nn.Module:
    """What plays the teacher in the ODE pairs and as DMD's real score: the teacher itself, or with
    --exact-teacher (toy world) the world's exact denoiser, a teacher with no error."""
    if not exact:
        return teacher
    if cfg.name != "tiny":
        raise cv.CausVidError("--exact-teacher exists for the toy world only (--tiny); drop it")
    return toy.ExactToyDenoiser(embed_prompts(text_encoder, toy.PROMPTS + [cfg.negative_prompt]), cfg.negative_prompt)


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------


def read_prompts(path: str | None, cfg: cv.Config) -> list[str]:
    """Training prompts: the toy world's 48, or one per line of a text file (required for Wan)."""
    if path is None:
        if cfg.name == "tiny":
            return list(toy.PROMPTS)
        raise cv.CausVidError("pass --prompts FILE (one prompt per line) to train on Wan")
    if not os.path.isfile(path):
        raise cv.CausVidError(f"prompt file {path!r} not found")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise cv.CausVidError(f"prompt file {path!r} holds no prompts; write one per line")
    return prompts


def embed_prompts(text_encoder: wan.TextEncoder, prompts: list[str], batch: int = 64) -> dict[str, torch.Tensor]:
    """Encode a fixed set of prompts once: prompt -> (L, D_text), kept on the CPU."""
    unique, out = list(dict.fromkeys(prompts)), {}
    for i in range(0, len(unique), batch):
        out.update(zip(unique[i:i + batch], text_encoder(unique[i:i + batch]).float().cpu()))
    return out


def stack_text(emb: dict[str, torch.Tensor], prompts: list[str], device) -> torch.Tensor:
    """The embeddings of a batch of prompts, (B, L, D_text) on `device`."""
    return torch.stack([emb[p] for p in prompts]).to(device)


# ------------------------------------------------------------------------------------------------
# Sampling: one front end for the teacher, the causal diffusion baseline and the student
# ------------------------------------------------------------------------------------------------


def chunk_rng(seed: int, chunk: int, stream: int, device) -> torch.Generator:
    """The random stream of one chunk (stream 0: its starting noise; 1: its re-noising, Alg. 2 line 8), on
    `device`. It depends on the seed and the chunk's index only: extending a video never changes its past."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + 2 * chunk + stream)


def prepare_for_inference(model: cv.DiT, device, dtype=None, compile: bool = False) -> cv.DiT:
    """Inference weights: bf16 on a GPU by default (half the memory, no autocast casts), fp32 on a
    CPU; compile=True compiles each block (one graph per block shape)."""
    model = model.to(device, dtype or inference_dtype(device)).eval()
    if compile:
        for block in model.blocks:
            block.compile()
    return model


def stream_video(model, kind: str, text, cfg: cv.Config, num_frames: int, seed: int, device, uncond=None,
                 context=None, video=None, start: int = 0, window=None, sink=None, use_cache: bool = True, vae=None,
                 batch: int = 64) -> Iterator[torch.Tensor]:
    """Videos from every kind of model, yielded as they are made: chunk by chunk (N, K, C, H, W), float on
    the CPU, for the streaming student; whole for the teachers.
      "teacher"  the bidirectional model: Euler + CFG over the whole clip (sample_ode)
      "causal"   a causal diffusion model: Euler + CFG chunk by chunk with the KV cache (sample_ode_causal)
      "student"  CausVid's streaming generator (Alg. 2; recompute_generate with use_cache=False)
    text (N, L, D_text) or one such tensor per chunk; context (N, F_c, ...) clean frames before the video
    (I2V), yielded first; video (N, F, ...) inputs noised chunk by chunk to student step `start` (V2V;
    pixels with a vae, encoded as the stream reaches them); window, sink: see stream_generate; vae decodes
    each chunk as it is made. The N videos run in batches of `batch` (from row i on with seed + i), advanced
    together: chunk c of every video is out before chunk c + 1 is made. A chunk's noise (chunk_rng) is
    drawn when the stream reaches it: nothing here grows with the video's length."""
    per_chunk = not isinstance(text, torch.Tensor)
    N, K = len(text[0] if per_chunk else text), cfg.chunk_size

    def rows(i: int) -> Iterator[torch.Tensor]:  # the videos of one batch, from row i
        n, sl, rng = min(batch, N - i), slice(i, i + batch), lambda c, stream: chunk_rng(seed + i, c, stream, device)
        txt = [x[sl].to(device) for x in text] if per_chunk else text[sl].to(device)
        ctx = None if context is None else context[sl].to(device)
        noise = (torch.randn(n, K, cfg.channels, cfg.height, cfg.width, generator=rng(c, 0), device=device)
                 for c in range(num_frames // K))
        if kind == "teacher":  # the whole clip at once: nothing to show before the end
            stream = [cv.sample_ode(model, torch.cat(list(noise), 1), txt, uncond, cfg.teacher_guidance,
                                    cfg.teacher_steps, cfg.shift)[0]]
        elif kind == "causal":
            stream = [cv.sample_ode_causal(model, torch.cat(list(noise), 1), txt, uncond, cfg.teacher_guidance,
                                           cfg.teacher_steps, cfg.shift, context=ctx)[0]]
        else:
            timesteps = cv.student_timesteps(cfg).to(device)[start:]
            if video is not None:  # SDEdit, lazily: a chunk is encoded and noised only when the loop reaches it
                frames = video[sl].to(device).split(4 * K if vae else K, 1)  # (Wan: 4 pixel frames a latent one)
                noise = (cv.add_noise(v, e, torch.full(v.shape[:2], float(timesteps[0]), device=device))
                         for v, e in zip(vae.encode_stream(frames, K) if vae else frames, noise))
            renoise = lambda c: rng(c, 1)
            if use_cache:
                stream = cv.stream_generate(model, noise, txt, timesteps, renoise, ctx, window, sink=sink,
                                            sink_gap=cfg.sink_gap)
            else:
                stream = cv.recompute_generate(model, torch.cat(list(noise), 1), txt, timesteps, renoise, ctx)
        stream = stream if ctx is None else itertools.chain([ctx], stream)  # the context leads the video
        for chunk in (stream if vae is None else vae.decode_stream(stream)):
            yield chunk.float().cpu()

    batches = [rows(i) for i in range(0, N, batch)]
    while True:
        with autocast(device), torch.no_grad():  # (around each step: a suspended generator holds neither open)
            chunks = [next(b, None) for b in batches]
        if chunks[0] is None:
            return
        yield torch.cat(chunks)


def generate(*args, **kw) -> tuple[torch.Tensor, float, float]:
    """stream_video's videos whole: -> (videos (N, F, C, H, W), seconds to the first chunk, seconds in all)."""
    t0, chunks, first = time.perf_counter(), [], None
    for chunk in stream_video(*args, **kw):
        chunks.append(chunk)
        first = first or time.perf_counter() - t0
    return torch.cat(chunks, 1), first, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# Video files
# ------------------------------------------------------------------------------------------------


class VideoWriter:
    """.gif / .mp4 files of N clips in a grid, each clip upscaled by nearest neighbour to at least 128
    pixels high (16x16 toy frames are visible), written chunk by chunk as they arrive -- append(uint8
    (N, k, H, W, 3)) -- so a stream of any length is written with flat memory. Under temporary names,
    renamed when the `with` block ends; a failure leaves no half file."""

    def __init__(self, paths: list[str], fps: int = 8, columns: int = 8):
        self.paths, self.fps, self.columns, self.writers = paths, fps, columns, []

    def __enter__(self):
        import imageio.v2 as imageio

        self.tmp = [f"{p}.tmp{os.getpid()}{os.path.splitext(p)[1]}" for p in self.paths]
        self.writers = [imageio.get_writer(t, duration=1000 / self.fps, loop=0) if t.endswith(".gif")
                        else imageio.get_writer(t, fps=self.fps, macro_block_size=1) for t in self.tmp]
        return self

    def append(self, frames: torch.Tensor):
        N, k, H, W, _ = frames.shape
        cols, scale = min(self.columns, N), max(1, 128 // H)
        rows = -(-N // cols)
        pad = torch.zeros(rows * cols - N, k, H, W, 3, dtype=torch.uint8)
        grid = torch.cat([frames, pad]).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        grid = F.pad(grid.permute(0, 1, 4, 2, 3), (1, 1, 1, 1), value=64).permute(0, 1, 3, 4, 2)  # grey borders
        for frame in rearrange(grid, "(r c) f h w x -> f (r h) (c w) x", r=rows, c=cols).numpy():
            for w in self.writers:
                w.append_data(frame)

    def __exit__(self, kind, error, tb):
        for w in self.writers:
            w.close()
        for tmp, path in zip(self.tmp, self.paths):
            if kind is None:
                os.replace(tmp, path)
            elif os.path.exists(tmp):  # (a writer that got no frame wrote no file)
                os.remove(tmp)
        return False


def write_video(path: str, frames: torch.Tensor, fps: int = 8, columns: int = 8):
    """uint8 (N, F, H, W, 3) -> one .gif or .mp4 of the N clips in a grid (VideoWriter)."""
    with VideoWriter([path], fps, columns) as writer:
        writer.append(frames)


def read_frames(path: str, cfg: cv.Config, flag: str = "--image") -> torch.Tensor:
    """An image (png, jpg, ...), a video (mp4, gif) or a samples .npz of ours -> uint8 (N, F, H, W, 3)
    at the model's pixel size (Wan: 8x its latents), N = 1 except for an npz of several videos. RGBA
    loses its alpha; frames of another size are resized (with a message); other channel counts and bit
    depths are refused; a --video must hold a chunk (Wan: 1 + 4k frames, its VAE's)."""
    wan_vae = cfg.name != "tiny"
    height, width = (cfg.height * 8, cfg.width * 8) if wan_vae else (cfg.height, cfg.width)
    import imageio.v2 as imageio
    import numpy as np

    if not os.path.isfile(path):
        raise cv.CausVidError(f"input {path!r} not found; check the path")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                arr = data["frames"]
        else:
            arr = np.stack(imageio.mimread(path, memtest=False))
    except Exception as e:
        raise cv.CausVidError(f"cannot read {path!r} as an image, a video or a samples .npz "
                              f"({str(e).splitlines()[0][:80]})") from None
    if arr.dtype != np.uint8:
        raise cv.CausVidError(f"{path!r} has {arr.dtype} pixels; give an 8-bit image or video")
    if arr.ndim == 3 or arr.shape[-1] not in (3, 4):  # grey frames (F, H, W), or odd channels
        channels = 1 if arr.ndim == 3 else arr.shape[-1]
        raise cv.CausVidError(f"{path!r} has {channels} channel(s) per pixel; give an RGB (or RGBA) image or video")
    frames = torch.from_numpy(arr[..., :3].copy())
    frames = frames[None] if frames.ndim == 4 else frames  # (N, F, H, W, 3)
    if frames.shape[2:4] != (height, width):
        print(f"note: {path!r} is {frames.shape[3]}x{frames.shape[2]}, the model's frames are {width}x{height}: resized")
        x = frames.flatten(0, 1).permute(0, 3, 1, 2).float()
        shrink = x.shape[2] >= height and x.shape[3] >= width
        x = F.interpolate(x, size=(height, width), mode="area" if shrink else "nearest")
        frames = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).unflatten(0, frames.shape[:2])
    n, K = frames.shape[1], cfg.chunk_size
    if flag == "--video" and wan_vae and wan.pixel_frames(wan.latent_frames(n)) != n:
        raise cv.CausVidError(f"--video has {n} frames; Wan's VAE encodes 1 + 4k frames: trim it to "
                              f"{wan.pixel_frames(wan.latent_frames(n))}")
    if flag == "--video" and (wan.latent_frames(n) if wan_vae else n) < K:
        raise cv.CausVidError(f"--video has {n} frames, fewer than one chunk ({wan.pixel_frames(K) if wan_vae else K}); "
                              "give a longer video")
    return frames


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def add_common_args(p):
    """The flags every script shares."""
    p.add_argument("--tiny", action="store_true", help="the toy-world preset: runs on a CPU")
    p.add_argument("--config", choices=sorted(cv.PRESETS), help="a named preset (--tiny is --config tiny)")
    p.add_argument("--run-dir", dest="run", help="where checkpoints are read and written (default: runs/<config>)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the preset's)")
    p.add_argument("--model-dir", help="Wan: the official Wan2.1-T2V-1.3B directory, either layout (with text_encoder/, vae/)")
    p.add_argument("--text-encoder", help="Wan: a UMT5 directory (tokenizer/ beside it), if not <model-dir>/text_encoder")
    p.add_argument("--vae", help="Wan: a diffusers AutoencoderKLWan directory, if not <model-dir>/vae")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set num_frames=9 --set student_step_indices=0,36,44")
    return p


def add_training_args(p):
    """The flags both training scripts share (train_dmd.py runs stage 1 first when it is missing)."""
    p.add_argument("--teacher", help="the bidirectional teacher checkpoint (default: <run>/teacher.safetensors; "
                                     "with --model-dir the Wan directory itself)")
    p.add_argument("--teacher-steps", type=int, help="toy world: pre-train the teacher for this many steps if "
                                                     "there is none (default: the preset's teacher_train_steps)")
    p.add_argument("--causal-teacher-steps", type=int, help="toy world, causal_ode_init: train the causal teacher "
                   "for this many steps if the run has none (default: the one shipped in weights/)")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="causal-forcing: Causal Forcing's recipe, causal "
                   "ODE init + Self-Forcing's DMD, optimiser and EMA (default: CausVid's; RECIPES, docs/successors.md)")
    p.add_argument("--pairs", type=int, help="number of ODE pairs (default: the preset's ode_pairs)")
    p.add_argument("--prompts", help="prompt file, one per line, for the ODE pairs (default: the 48 toy "
                                     "prompts; required for Wan)")
    p.add_argument("--exact-teacher", action="store_true", help="toy world: the world's exact denoiser plays the "
                                                                "teacher (ODE pairs, DMD's real score)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from <run>/<stage>_state/")
    p.add_argument("--save-every", type=int, default=500, help="steps between saves of the resumable state "
                                                               "(default: 500; Ctrl-C also saves)")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines (default: 100)")
    return p


def parse_overrides(items: list[str]) -> dict:
    """["num_frames=9", "student_step_indices=0,36,44"] -> typed Config overrides."""
    types = {f.name: type(getattr(cv.Config(), f.name)) for f in fields(cv.Config)}
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in types:
            raise cv.CausVidError(f"--set {item!r}: expected KEY=VALUE with KEY one of the Config fields "
                                  f"({', '.join(sorted(types))})")
        try:
            kind = types[key]
            if kind is bool and value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            out[key] = (tuple(int(v) for v in value.split(",")) if kind is tuple
                        else value.lower() in ("true", "1") if kind is bool else kind(value))
        except ValueError:
            raise cv.CausVidError(f"--set {item!r}: {value!r} is not a valid {types[key].__name__}") from None
    return out


# flags that set a Config field: (argparse dest, field)
FLAG_FIELDS = [("batch_size", "batch_size"), ("teacher_steps", "teacher_train_steps"), ("pairs", "ode_pairs"),
               ("causal_teacher_steps", "causal_teacher_steps"), ("ode_steps", "ode_steps"), ("dmd_steps", "dmd_steps")]

# --recipe: a successor's recipe as one flag (over the preset, under the flags and --set). Causal Forcing's: causal ODE
# init, Self-Forcing's DMD with their Adam (beta1 0), rates and EMA (configs/causal_forcing_dmd_chunkwise.yaml; shift,
# steps, CFG kept); on the toy world at rates x 4 for twice the iterations, the most accurate (docs/successors.md)
CAUSAL_FORCING = dict(causal_ode_init=True, self_forcing=True, dmd_beta1=0.0, generator_ema=0.99, generator_ema_start=200)
RECIPES = {"causal-forcing": {"tiny": dict(CAUSAL_FORCING, lr_generator=2e-4, lr_critic=4e-5, dmd_steps=800),
                              "wan2.1-t2v-1.3b": dict(CAUSAL_FORCING, lr_generator=2e-6, lr_critic=4e-7)}}


def resolve(args) -> tuple[cv.Config, torch.device, str]:
    """-> (config, device, run directory), from the common flags: the preset, then --recipe, then the flags
    that set a field, then --set, then the Wan directory's shapes and paths."""
    if args.tiny and args.config not in (None, "tiny"):
        raise cv.CausVidError(f"--tiny and --config {args.config} contradict each other; give one")
    name = "tiny" if args.tiny else args.config
    if name is None:
        raise cv.CausVidError("choose a preset: --tiny (toy world, CPU) or --config wan2.1-t2v-1.3b")
    overrides = dict(RECIPES[args.recipe][name]) if getattr(args, "recipe", None) else {}
    overrides.update({f: getattr(args, dest) for dest, f in FLAG_FIELDS if getattr(args, dest, None) is not None})
    overrides.update(parse_overrides(args.set))
    cfg = cv.get_config(name, **overrides)
    if args.model_dir:
        cfg = replace(wan.wan_config(args.model_dir, cfg)[0], **overrides)
    paths = {"text_encoder": args.text_encoder, "vae": args.vae}
    cfg = replace(cfg, **{k: os.path.abspath(v) for k, v in paths.items() if v})
    return cfg, pick_device(args.device), args.run or os.path.join("runs", name)


def writable_dir(path: str, flag: str) -> str:
    """Make sure `path` is a directory we can write to now, not after an hour of training."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise cv.CausVidError(f"cannot write to {flag} {path!r} ({e.strerror}); pass a directory you can write to") from None
    return path


SHIPPED_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "toy_teacher.safetensors")


def teacher_path(args, run: str, cfg: cv.Config) -> str:
    """Where the bidirectional teacher comes from: --teacher; else the run's teacher.safetensors; else the Wan
    directory (--model-dir); else, on the toy world, weights/'s -- unless --teacher-steps trains one into the run."""
    own, given = os.path.join(run, "teacher.safetensors"), getattr(args, "teacher", None)
    if isinstance(given, str):  # train scripts' --teacher PATH (sample.py's --teacher is a switch)
        return given
    if os.path.exists(own):
        return own
    if args.model_dir:
        return args.model_dir
    if cfg.name == "tiny" and getattr(args, "teacher_steps", None) is None and os.path.exists(SHIPPED_TEACHER):
        return SHIPPED_TEACHER
    return own


SHIPPED_CAUSAL_TEACHER = os.path.join(os.path.dirname(SHIPPED_TEACHER), "toy_causal_teacher.safetensors")


def causal_teacher_path(args, run: str, cfg: cv.Config) -> str:
    """Where causal_ode_init's causal teacher comes from: the run's causal_diffusion.safetensors; else, on the toy
    world, weights/'s -- unless --causal-teacher-steps trains one into the run."""
    own = os.path.join(run, "causal_diffusion.safetensors")
    if os.path.exists(own) or cfg.name != "tiny" or getattr(args, "causal_teacher_steps", None) is not None:
        return own
    return SHIPPED_CAUSAL_TEACHER if os.path.exists(SHIPPED_CAUSAL_TEACHER) else own


def run_cli(main: Callable):
    """The scripts' entry point: a CausVidError is printed as one line and exits with code 2."""
    try:
        main()
    except cv.CausVidError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
