"""What the three scripts share and the method does not need: the command line and the world a run
lives in (toy_world.ToyWorld or wan.WanWorld), devices, checkpoints, the one sampling front end and
video files. Nothing here is CausVid: causvid.py is. training.py holds what only training needs.
"""

import contextlib
import functools
import itertools
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, fields, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

import causvid as cv
import successors
import toy_world as toy
import wan

# ------------------------------------------------------------------------------------------------
# The command line: flags -> (config, device, run directory) -> the world
# ------------------------------------------------------------------------------------------------


def add_common_args(p):
    """The flags every script shares."""
    p.add_argument("--tiny", action="store_true", help="the toy-world preset: runs on a CPU")
    p.add_argument(
        "--config", choices=sorted(cv.PRESETS), help="a named preset (--tiny is --config tiny)"
    )
    p.add_argument(
        "--run-dir",
        dest="run",
        help="where checkpoints are read and written (default: runs/<config>)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the preset's)")
    p.add_argument(
        "--model-dir",
        help="Wan: the official Wan2.1-T2V-1.3B directory, either layout (with text_encoder/, "
        "vae/)",
    )
    p.add_argument(
        "--text-encoder",
        help="Wan: a UMT5 directory (tokenizer/ beside it), if not <model-dir>/text_encoder",
    )
    p.add_argument(
        "--vae", help="Wan: a diffusers AutoencoderKLWan directory, if not <model-dir>/vae"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set num_frames=9 --set student_step_indices=0,36,44",
    )
    return p


def add_training_args(p):
    """The flags both training scripts share (train_dmd.py runs stage 1 first when missing)."""
    p.add_argument(
        "--teacher",
        help="the bidirectional teacher checkpoint (default: <run>/teacher.safetensors; with "
        "--model-dir the Wan directory itself)",
    )
    p.add_argument(
        "--teacher-steps",
        type=int,
        help="toy world: pre-train the teacher for this many steps if there is none (default: the "
        "preset's teacher_train_steps)",
    )
    p.add_argument(
        "--causal-teacher-steps",
        type=int,
        help="toy world, causal_ode_init: train the causal teacher for this many steps if the run "
        "has none (default: the one shipped in weights/)",
    )
    p.add_argument(
        "--recipe",
        choices=sorted(successors.RECIPES),
        help="causal-forcing: Causal Forcing's recipe, causal ODE init + Self-Forcing's DMD, "
        "optimiser and EMA; diagonal (toy world): causal ODE init + the rollout, chunk 0 in 8 "
        "steps (default: CausVid's; successors.RECIPES, docs/successors.md)",
    )
    p.add_argument(
        "--pairs", type=int, help="number of ODE pairs (default: the preset's ode_pairs)"
    )
    p.add_argument(
        "--prompts",
        help="prompt file, one per line, for the ODE pairs (default: the 48 toy prompts; required "
        "for Wan)",
    )
    p.add_argument(
        "--exact-teacher",
        action="store_true",
        help="toy world: the world's exact denoiser plays the teacher (ODE pairs, DMD's real "
        "score)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from <run>/<stage>_state/",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=500,
        help="steps between saves of the resumable state (default: 500; Ctrl-C also saves)",
    )
    p.add_argument(
        "--log-every", type=int, default=100, help="steps between log lines (default: 100)"
    )
    return p


def parse_overrides(items: list[str]) -> dict:
    """["num_frames=9", "student_step_indices=0,36,44"] -> typed Config overrides."""
    types = {f.name: type(getattr(cv.Config(), f.name)) for f in fields(cv.Config)}
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in types:
            raise cv.CausVidError(
                f"--set {item!r}: expected KEY=VALUE with KEY one of the Config fields "
                f"({', '.join(sorted(types))})"
            )
        kind = types[key]
        try:
            if kind is tuple:
                out[key] = tuple(int(v) for v in value.split(",") if v.strip())
                if not out[key] and key != "first_chunk_step_indices":  # (its "": off)
                    raise ValueError
            elif kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = kind(value)
        except ValueError:
            raise cv.CausVidError(
                f"--set {item!r}: {value!r} is not a valid {kind.__name__}"
            ) from None
    return out


# flags that set a Config field: (argparse dest, field)
FLAG_FIELDS = [
    ("batch_size", "batch_size"),
    ("teacher_steps", "teacher_train_steps"),
    ("pairs", "ode_pairs"),
    ("causal_teacher_steps", "causal_teacher_steps"),
    ("ode_steps", "ode_steps"),
    ("dmd_steps", "dmd_steps"),
]


def resolve(args) -> tuple[cv.Config, torch.device, str]:
    """-> (config, device, run directory), from the common flags: the preset, then --recipe, then
    the flags that set a field, then --set, then the Wan directory's shapes and paths."""
    if args.tiny and args.config not in (None, "tiny"):
        raise cv.CausVidError(f"--tiny and --config {args.config} contradict each other; give one")
    name = "tiny" if args.tiny else args.config
    if name is None:
        raise cv.CausVidError(
            "choose a preset: --tiny (toy world, CPU) or --config wan2.1-t2v-1.3b"
        )
    overrides = {}
    if getattr(args, "recipe", None):
        if name not in successors.RECIPES[args.recipe]:
            raise cv.CausVidError(
                f"--recipe {args.recipe} is measured on the toy world only (--tiny); for {name}, "
                "give its settings with --set (successors.RECIPES)"
            )
        overrides.update(successors.RECIPES[args.recipe][name])
    for dest, field in FLAG_FIELDS:
        if getattr(args, dest, None) is not None:
            overrides[field] = getattr(args, dest)
    overrides.update(parse_overrides(args.set))
    cfg = cv.get_config(name, **overrides)
    if args.model_dir:
        cfg = replace(wan.wan_config(args.model_dir, cfg)[0], **overrides)
    paths = {"text_encoder": args.text_encoder, "vae": args.vae}
    cfg = replace(cfg, **{k: os.path.abspath(v) for k, v in paths.items() if v})
    return cfg, pick_device(args.device), args.run or os.path.join("runs", name)


def make_world(cfg: cv.Config, device: torch.device, model_dir: str | None = None):
    """The world a preset lives in: what the scripts ask of it is the same for both (ToyWorld)."""
    if cfg.name == "tiny":
        return toy.ToyWorld(cfg, device)
    return wan.WanWorld(cfg, device, inference_dtype(device), model_dir)


def writable_dir(path: str, flag: str) -> str:
    """Make sure `path` is a directory we can write to now, not after an hour of training."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise cv.CausVidError(
            f"cannot write to {flag} {path!r} ({e.strerror}); pass a directory you can write to"
        ) from None
    return path


def teacher_path(args, run: str, world) -> str:
    """Where the bidirectional teacher comes from: --teacher; else the run's teacher.safetensors;
    else the world's pretrained one (the Wan directory; on the toy world the one in weights/, unless
    --teacher-steps trains one into the run)."""
    own = os.path.join(run, "teacher.safetensors")
    given = getattr(args, "teacher", None)
    if isinstance(given, str):  # the training scripts' --teacher PATH (sample.py's is a switch)
        return given
    if os.path.exists(own) or getattr(args, "teacher_steps", None) is not None:
        return own
    if world.pretrained_teacher and os.path.exists(world.pretrained_teacher):
        return world.pretrained_teacher
    return own


def causal_teacher_path(args, run: str, world) -> str:
    """Where causal_ode_init's causal teacher comes from: the run's causal_diffusion.safetensors;
    else the world's (weights/'s on the toy world), unless --causal-teacher-steps trains one."""
    own = os.path.join(run, "causal_diffusion.safetensors")
    shipped = world.pretrained_causal_teacher
    if os.path.exists(own) or getattr(args, "causal_teacher_steps", None) is not None:
        return own
    if shipped and os.path.exists(shipped):
        return shipped
    return own


def read_prompts(path: str | None, world) -> list[str]:
    """Training prompts: one per line of a text file, else the world's own (the toy world's 48)."""
    if path is None:
        if not world.prompts:
            raise cv.CausVidError(
                f"pass --prompts FILE (one prompt per line) to train on {world.name}"
            )
        return list(world.prompts)
    if not os.path.isfile(path):
        raise cv.CausVidError(f"prompt file {path!r} not found")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise cv.CausVidError(f"prompt file {path!r} holds no prompts; write one per line")
    return prompts


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


# ------------------------------------------------------------------------------------------------
# Devices and precision
# ------------------------------------------------------------------------------------------------


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise cv.CausVidError(
            f"--device {name} was given but torch sees no CUDA GPU; use --device cpu"
        )
    return torch.device(name)


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on a CPU: UMT5 (Wan ships it in bf16), the VAE, the DiT's inference
    weights."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# RMSNorm under CPU autocast gets bf16 activations and fp32 weights and says so once per process
# (it takes its unfused kernel); the warning is torch's, nothing here to fix
warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")


def autocast(device: torch.device, training: bool = False):
    """bf16 autocast on CUDA. On a CPU only for training steps and their data (the ODE pairs), and
    only where the CPU computes in bf16 natively (AVX512-BF16 or AMX: about 15-20% faster per toy
    teacher step, 13% faster ODE pairs); sampling on a CPU, training on other CPUs, and all of it
    with CAUSVID_CPU_FP32=1 (the same numbers on every CPU) stay fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    native = os.environ.get("CAUSVID_CPU_FP32") != "1" and (avx512_bf16 or amx)
    if training and native:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# Checkpoints: .safetensors with the config in the header; never unpickled
# ------------------------------------------------------------------------------------------------


def save_checkpoint(path: str, tensors: dict[str, torch.Tensor], cfg: cv.Config, **meta):
    """Weights as .safetensors, the config (and any JSON-able meta) in its header, so the file
    alone rebuilds its model. Written to a temporary file and renamed: a crash never leaves half a
    file."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    header = {"config": json.dumps(asdict(cfg)), **{k: json.dumps(v) for k, v in meta.items()}}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        cpu = {k: v.detach().cpu().clone() for k, v in tensors.items()}  # clone: no shared storage
        save_file(cpu, tmp, metadata=header)
        with open(tmp, "rb") as f:  # the bytes are on disk before the rename makes them the file
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, keep: Callable[[str], bool] = lambda key: True):
    """-> (tensors whose names pass `keep`, config, meta); the other tensors are never read."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise cv.CausVidError(
            f"checkpoint {path!r} not found; check the path (train_ode.py / train_dmd.py write "
            "runs/<config>/{teacher,ode,dmd}.safetensors)"
        )
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys() if keep(k)}
    except Exception as e:  # safetensors' own error types differ between versions
        raise cv.CausVidError(
            f"{path!r} is not a readable .safetensors checkpoint (wrong format or truncated: "
            f"{str(e).splitlines()[0][:80]}); pass a file written by these scripts"
        ) from None
    if "config" not in header:
        raise cv.CausVidError(
            f"{path!r} is a safetensors file but not a CausVid checkpoint (no config in its header)"
        )
    meta = {k: json.loads(v) for k, v in header.items() if k != "config"}
    return tensors, cv.config_from_dict(json.loads(header["config"])), meta


def check_preset(cfg: cv.Config, expected: cv.Config | None, path: str):
    """A checkpoint made with one preset cannot run under another."""
    if expected is not None and cfg.name != expected.name:
        raise cv.CausVidError(
            f"{path!r} holds a {cfg.name!r} model but the preset asked for is {expected.name!r}; "
            f"pass --config {cfg.name} (or --tiny), or a checkpoint of {expected.name!r}"
        )


def load_model(
    path: str, causal: bool | None = None, device="cpu", expect: cv.Config | None = None
):
    """Rebuild a DiT from a checkpoint alone; causal=None keeps the role it was saved with. A
    directory is an official Wan2.1 release (the bidirectional teacher). expect: the preset the
    caller runs under; a checkpoint of another preset is refused."""
    if os.path.isdir(path):
        base = expect or cv.get_config("wan2.1-t2v-1.3b")
        return wan.load_wan(path, base, bool(causal)).to(device)
    tensors, cfg, meta = load_checkpoint(path, keep=lambda k: not k.startswith("text_encoder."))
    check_preset(cfg, expect, path)
    if causal is None:
        causal = meta.get("causal", False)
    model = cv.DiT(cfg, causal=causal)
    wan.load_state_dict_strict(model, tensors, path)
    return model.to(device)


def stack_text(emb: dict[str, torch.Tensor], prompts: list[str], device) -> torch.Tensor:
    """The embeddings of a batch of prompts, (B, L, D_text) on `device`."""
    return torch.stack([emb[p] for p in prompts]).to(device)


# ------------------------------------------------------------------------------------------------
# Sampling: one front end for the teacher, the causal diffusion baseline and the student
# ------------------------------------------------------------------------------------------------


def chunk_rng(seed: int, chunk: int, stream: int, device) -> torch.Generator:
    """The random stream of one chunk (stream 0: its starting noise; 1: its re-noising, Alg. 2 line
    8), on `device`. It depends on the seed and the chunk's index only: extending a video never
    changes its past."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + 2 * chunk + stream)


def prepare_for_inference(model: cv.DiT, device, dtype=None, compile: bool = False) -> cv.DiT:
    """Inference weights: bf16 on a GPU by default (half the memory, no autocast casts), fp32 on a
    CPU; compile=True compiles each block (one graph per block shape)."""
    model = model.to(device, dtype or inference_dtype(device)).eval()
    if compile:
        for block in model.blocks:
            block.compile()
    return model


def streaming(window: int | None = None, sink: int | None = None, sink_gap: int = 0) -> Callable:
    """Alg. 2's loop for a video of any length, picked once: the plain stream (no window); the
    official re-encoding window (causvid.windowed_generate); or a rolling cache keeping `sink`
    frames (successors.rolling_generate)."""
    if window is None:
        return cv.stream_generate
    if sink is None:
        return functools.partial(cv.windowed_generate, window=window)
    return functools.partial(
        successors.rolling_generate, window=window, sink=sink, sink_gap=sink_gap
    )


def sampler(
    model,
    kind: str,
    cfg: cv.Config,
    device,
    uncond=None,
    generate=None,
    start: int = 0,
    first=None,
):
    """How a model makes one batch of videos, picked once. -> make(noise chunks, text, context,
    renoise, video chunks) -> an iterator of clean chunks in the DiT's space:
      "teacher"  the bidirectional model: Euler + CFG over the whole clip (sample_ode)
      "causal"   a causal diffusion model: Euler + CFG chunk by chunk over its cache
                 (sample_ode_causal)
      "student"  CausVid's streaming generator: `generate` (default cv.stream_generate; streaming()
                 for long videos, cv.recompute_generate for Table 3's baseline) from student step
                 `start`, each chunk over its steps (successors.chunk_schedule); video chunks,
                 where given, are noised to that step (SDEdit, Sec. 5.3); `first`, where given,
                 makes chunk 0 instead (successors.teacher_first_chunk)
    The teachers make the whole clip at once: nothing to show before the end."""
    if kind in ("teacher", "causal"):
        ode = cv.sample_ode if kind == "teacher" else cv.sample_ode_causal

        def make(noise, text, context, renoise, video):
            options = dict(guidance=cfg.teacher_guidance, steps=cfg.teacher_steps, shift=cfg.shift)
            if context is not None:  # (a causal model's cache starts from it)
                options["context"] = context
            x0, _ = ode(model, torch.cat(list(noise), 1), text, uncond, **options)
            return [x0]

    else:
        t_start = float(cv.student_timesteps(cfg)[start])
        timesteps = successors.chunk_schedule(cfg, device, below=t_start)
        index = cfg.student_step_indices[start]
        if cfg.first_chunk_step_indices and index not in cfg.first_chunk_step_indices:
            raise cv.CausVidError(
                f"video-to-video starts at index {index} of the teacher's schedule, which "
                "first_chunk_step_indices lacks; add it, or sample with --set "
                "first_chunk_step_indices="
            )
        generate = generate or cv.stream_generate
        if first is not None:  # chunk 0 by `first`, the rest by the student over it
            generate = functools.partial(
                successors.first_chunk_generate, first=first, then=generate
            )

        def make(noise, text, context, renoise, video):
            if video is not None:  # a chunk is noised only when the loop reaches it
                noise = (sdedit(v, e, t_start) for v, e in zip(video, noise))
            return generate(model, noise, text, timesteps, renoise, context)

    return make


def student_start(cfg: cv.Config, strength: float) -> int:
    """Video-to-video (--strength): the first student step at or below strength * 1000."""
    ts = cv.student_timesteps(cfg).tolist()
    if not 0 < strength <= 1:
        raise cv.CausVidError(f"--strength {strength} must lie in (0, 1]")
    ok = [i for i, t in enumerate(ts) if t <= strength * 1000 + 1e-3]
    if not ok:
        raise cv.CausVidError(
            f"--strength {strength} is below the student's lowest step t = {ts[-1]:.0f}; use at "
            f"least {ts[-1] / 1000:.3f}"
        )
    return ok[0]


def sdedit(x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """Video-to-video (Sec. 5.3, SDEdit): an input chunk noised to the step denoising starts at."""
    return cv.add_noise(x0, noise, torch.full(x0.shape[:2], t, device=x0.device))


def stream_video(
    make, text, num_frames: int, world, seed: int, context=None, video=None, batch: int = 64
) -> Iterator[torch.Tensor]:
    """Videos made by make = sampler(...), yielded as they are made, as uint8 pixel chunks
    (N, k, H, W, 3) on the CPU: chunk by chunk for the streaming student, whole for the teachers.

    text     (N, L, D_text), or one such tensor per chunk (dynamic prompting)
    context  clean frames (N, F_c, ...) in the DiT's space before the video (image-to-video),
             yielded first
    video    uint8 input pixels (N, F, H, W, 3) to follow (video-to-video), encoded by the world as
             the stream reaches them
    The N videos run in batches of `batch` (from row i on with seed + i), advanced together: chunk c
    of every video is out before chunk c + 1 is made. A chunk's noise (chunk_rng) is drawn when the
    stream reaches it, and the world decodes each chunk as it is made: nothing grows with length.
    """
    per_chunk = not isinstance(text, torch.Tensor)
    N = len(text[0] if per_chunk else text)
    cfg = world.cfg
    K = cfg.chunk_size
    device = world.device

    def rows(i: int) -> Iterator[torch.Tensor]:  # the videos of one batch, from row i
        n = min(batch, N - i)
        sl = slice(i, i + batch)
        txt = [x[sl].to(device) for x in text] if per_chunk else text[sl].to(device)
        ctx = None if context is None else context[sl].to(device)
        shape = (n, K, cfg.channels, cfg.height, cfg.width)
        noise = (
            torch.randn(shape, generator=chunk_rng(seed + i, c, 0, device), device=device)
            for c in range(num_frames // K)
        )
        chunks = None
        if video is not None:  # a chunk's worth of pixels at a time, encoded as they are reached
            chunks = world.encode_stream(video[sl].split(world.pixel_frames(K), 1), K)
        stream = make(noise, txt, ctx, lambda c: chunk_rng(seed + i, c, 1, device), chunks)
        if ctx is not None:  # the context leads the video
            stream = itertools.chain([ctx], stream)
        yield from world.decode_stream(stream)

    batches = [rows(i) for i in range(0, N, batch)]
    while True:
        # (around each step: a suspended generator holds neither context open)
        with autocast(device), torch.no_grad():
            chunks = [next(b, None) for b in batches]
        if chunks[0] is None:
            return
        yield torch.cat(chunks)


def generate(*args, **kw) -> tuple[torch.Tensor, float, float]:
    """stream_video's videos whole: -> (uint8 videos (N, F, H, W, 3), seconds to the first chunk,
    seconds in all)."""
    t0 = time.perf_counter()
    chunks = []
    first = None
    for chunk in stream_video(*args, **kw):
        chunks.append(chunk)
        first = first or time.perf_counter() - t0
    return torch.cat(chunks, 1), first, time.perf_counter() - t0


def scorecard(world, models: dict, text_encoder, path: str, seed: int = 0, every: int = 6):
    """How a run ended, on the toy world: each model (name -> (model, sampler kind)) makes one video
    per prompt from the same noise (seed); their scores as a table, and one GIF at `path` of the
    models row by row (every `every`-th prompt)."""
    t0 = time.perf_counter()
    cfg = world.cfg
    prompts = list(world.prompts)
    emb = text_encoder.embed(prompts + [cfg.negative_prompt])
    text = stack_text(emb, prompts, "cpu")
    uncond = emb[cfg.negative_prompt][None].to(world.device)
    lines = [
        f"scores of {len(prompts)} prompts x 1 sample, seed {seed} (sample.py --samples-per-prompt "
        "4 gives the README's):",
        f"{'':<16}{'best-fit PSNR':>15}{'accuracy':>10}{'steady':>8}{'first-chunk pauses':>20}",
    ]
    rows = []
    for name, (model, kind) in tqdm(models.items(), desc="scoring", leave=False):
        model = prepare_for_inference(model, world.device)
        make = sampler(model, kind, cfg, world.device, uncond)
        video = generate(make, text, cfg.num_frames, world, seed=seed)[0]
        s = world.score(video, prompts, several=False, quiet=True)
        lines.append(
            f"{name:<16}{s['best_fit_psnr']:>12.2f} dB{100 * s['prompt_accuracy']:>9.1f}%"
            f"{100 * s['steady_motion']:>7.1f}%{100 * s['first_chunk_pause']:>19.1f}%"
        )
        rows.append(video[::every])
    write_video(path, torch.cat(rows), columns=len(rows[0]))
    print("\n".join(lines))
    print(
        f"wrote {path}: {', '.join(models)}, row by row (every {every}th prompt); "
        f"{time.perf_counter() - t0:.0f} s"
    )


# ------------------------------------------------------------------------------------------------
# Video files
# ------------------------------------------------------------------------------------------------


class VideoWriter:
    """.gif / .mp4 files of N clips in a grid, each clip upscaled by nearest neighbour to at least
    128 pixels high (16x16 toy frames are visible), written chunk by chunk as they arrive --
    append(uint8 (N, k, H, W, 3)) -- so a stream of any length is written with flat memory. Under
    temporary names, renamed when the `with` block ends; a failure leaves no half file."""

    def __init__(self, paths: list[str], fps: int = 8, columns: int = 8):
        self.paths = paths
        self.fps = fps
        self.columns = columns
        self.writers = []

    def __enter__(self):
        import imageio.v2 as imageio

        self.tmp = [f"{p}.tmp{os.getpid()}{os.path.splitext(p)[1]}" for p in self.paths]
        for tmp in self.tmp:
            if tmp.endswith(".gif"):
                self.writers.append(imageio.get_writer(tmp, duration=1000 / self.fps, loop=0))
            else:
                self.writers.append(imageio.get_writer(tmp, fps=self.fps, macro_block_size=1))
        return self

    def append(self, frames: torch.Tensor):
        N, k, H, W, _ = frames.shape
        cols = min(self.columns, N)
        scale = max(1, 128 // H)
        rows = -(-N // cols)
        pad = torch.zeros(rows * cols - N, k, H, W, 3, dtype=torch.uint8)
        grid = torch.cat([frames, pad]).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        grid = F.pad(grid.permute(0, 1, 4, 2, 3), (1, 1, 1, 1), value=64)  # grey borders
        grid = grid.permute(0, 1, 3, 4, 2)
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


def read_video(source: str | bytes, world, name: str = "--video", **read) -> torch.Tensor:
    """A video to follow (video-to-video), from a path or an upload's bytes: uint8 (N, F, H, W, 3)
    at the world's pixel size, whole latent frames (Wan: 1 + 4k frames), a chunk at least.
    read: read_frames's memtest and note."""
    frames = read_frames(source, *world.pixel_size, name="" if name == "--video" else name, **read)
    n = frames.shape[1]
    whole = world.pixel_frames(world.latent_frames(n))
    if whole != n:
        raise cv.CausVidError(
            f"{name} has {n} frames; Wan's VAE encodes 1 + 4k frames: trim it to {whole}"
        )
    K = world.cfg.chunk_size
    if world.latent_frames(n) < K:
        raise cv.CausVidError(
            f"{name} has {n} frames, fewer than one chunk ({world.pixel_frames(K)}); "
            "give a longer video"
        )
    return frames


def read_frames(
    source: str | bytes, height: int, width: int, name: str = "", memtest=False, note=print
) -> torch.Tensor:
    """An image (png, jpg, ...), a video (mp4, gif) or a samples .npz of ours, from a path or from
    its bytes (an upload, called `name` in messages) -> uint8 (N, F, H, W, 3) at height x width,
    N = 1 except for an npz of several videos. RGBA loses its alpha; frames of another size are
    resized (said through `note`); other channel counts and bit depths are refused. memtest: the
    most decoded bytes to accept (e.g. "64MB"; imageio's guard against decompression bombs)."""
    import io

    import imageio.v2 as imageio
    import numpy as np

    uploaded = isinstance(source, bytes)
    path = name or ("the upload" if uploaded else source)  # what the messages call it
    if not uploaded and not os.path.isfile(source):
        raise cv.CausVidError(f"input {path!r} not found; check the path")
    if uploaded:
        is_npz = source[:2] == b"PK"  # (an npz is a zip)
    else:
        is_npz = source.endswith(".npz")
    try:
        if is_npz:
            with np.load(io.BytesIO(source) if uploaded else source, allow_pickle=False) as data:
                arr = data["frames"]
        else:
            arr = np.stack(imageio.mimread(source, memtest=memtest))
    except Exception as e:
        raise cv.CausVidError(
            f"cannot read {path!r} as an image, a video or a samples .npz "
            f"({str(e).splitlines()[0][:80]})"
        ) from None
    if arr.dtype != np.uint8:
        raise cv.CausVidError(f"{path!r} has {arr.dtype} pixels; give an 8-bit image or video")
    if arr.ndim == 3 or arr.shape[-1] not in (3, 4):  # grey frames (F, H, W), or odd channels
        channels = 1 if arr.ndim == 3 else arr.shape[-1]
        raise cv.CausVidError(
            f"{path!r} has {channels} channel(s) per pixel; give an RGB (or RGBA) image or video"
        )
    frames = torch.from_numpy(arr[..., :3].copy())
    if frames.ndim == 4:
        frames = frames[None]  # (N, F, H, W, 3)
    if frames.shape[2:4] != (height, width):
        note(
            f"note: {path!r} is {frames.shape[3]}x{frames.shape[2]}, the model's frames are "
            f"{width}x{height}: resized"
        )
        x = frames.flatten(0, 1).permute(0, 3, 1, 2).float()
        shrink = x.shape[2] >= height and x.shape[3] >= width
        x = F.interpolate(x, size=(height, width), mode="area" if shrink else "nearest")
        x = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        frames = x.unflatten(0, frames.shape[:2])
    return frames
