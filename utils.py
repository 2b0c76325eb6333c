"""What the scripts share and the method does not need: checkpoints, the resumable training loop,
the one flow-matching pre-training loop, the one sampling front end, prompts, video files and the
command line. Nothing here is CausVid; causvid.py is.
"""

import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, fields, replace
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

import causvid as cv
import toy_world as toy
import wan

# DCP says on every save and load without a process group that it assumes one process: it is right
warnings.filterwarnings("ignore", message="torch.distributed is .*single process")

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
    """bf16 autocast on CUDA. On a CPU only for training steps, and only where the CPU computes in
    bf16 natively (AVX512-BF16 or AMX: about 15-20% faster per toy teacher step); sampling on a CPU,
    and training on other CPUs, stays fp32 -- as does all of it with CAUSVID_CPU_FP32=1 (the same
    numbers on every CPU)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    native = os.environ.get("CAUSVID_CPU_FP32") != "1" and (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return torch.autocast("cpu", dtype=torch.bfloat16) if training and native else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# Many GPUs: torchrun and FSDP2. In one process every helper here is a no-op.
# ------------------------------------------------------------------------------------------------


def backend(device: torch.device) -> str:
    """The process group's backends: on GPUs NCCL for CUDA tensors beside gloo for the CPU ones (the
    logged losses, the stop flag), so no collective here needs to know where its tensor lives."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): join the process group (one GPU per process, the local rank's)
    and silence the other ranks' prints (rank 0 logs). -> the device. The timeout (1 h, NCCL's default
    is 10 min) covers the longest any rank waits for the others: rank 0 writing a Wan checkpoint, the
    last ODE-pair shards."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend(device), timeout=timedelta(hours=1),
                                device_id=device if device.type == "cuda" else None)
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if world() > 1:
        dist.barrier()


def mixed_precision(device: torch.device):
    """FSDP2's precision: on GPUs the gathered weights in bf16 (what autocast computes in anyway: half the
    all-gather) and the gradients reduced in fp32; the inputs are left as they are (FSDP2 would cast
    the timesteps to bf16: 757 -> 756) and autocast picks each op's dtype. On CPUs fp32 throughout."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 (torch.distributed.fsdp.fully_shard): each DiT block, then the rest, split over the ranks,
    parameters gathered per block as the forward reaches it (the official release also wraps per block)."""
    if world() > 1:
        from torch.distributed.fsdp import fully_shard

        policy = mixed_precision(next(model.parameters()).device)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """FSDP2 reduces gradients over the ranks only on the last micro-batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)


def mean_over_ranks(value) -> float:
    """A number averaged over the ranks (the loss every rank logs and checks)."""
    value = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if world() > 1:
        dist.all_reduce(value)
        value = value / world()
    return value.item()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, gathered from the ranks' shards (on rank 0; every rank calls)."""
    if world() == 1:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class Streams:
    """The random streams of this rank's micro-batches. Micro-batch m of the global batch (m = rank x
    accumulate + a) draws its data from generator m and the noise and timesteps drawn inside causvid's
    functions from torch's global generator in state m. Stream 0 is the process's own global state, so
    one process with accumulate 1 is the plain loop; the others are seeded from (seed, m). Any split of
    the global batch over ranks and accumulation draws the same numbers: N ranks x A micro-batches log
    the losses of one process with N x A, and a run saved on one split resumes on another."""

    def __init__(self, seed: int, accumulate: int):
        self.seed, self.index = seed, [rank() * accumulate + a for a in range(accumulate)]
        self.data = [torch.Generator().manual_seed(self.stream_seed(m)) for m in self.index]
        outer, self.torch = global_rng(), {}  # torch's global states of streams m > 0
        for m in self.index[1 if self.index[0] == 0 else 0:]:
            torch.manual_seed(self.stream_seed(m))
            self.torch[m] = global_rng()
        set_global_rng(outer)

    def stream_seed(self, m: int) -> int:
        return self.seed if m == 0 else self.seed * 1_000_003 + m

    @contextlib.contextmanager
    def use(self, a: int):
        """Draw from micro-batch a's streams: yields its data generator, switches torch's global one."""
        m = self.index[a]
        if m == 0:
            yield self.data[a]
            return
        outer = global_rng()
        set_global_rng(self.torch[m])
        try:
            yield self.data[a]
        finally:
            self.torch[m] = global_rng()
            set_global_rng(outer)

    def state_dict(self) -> dict:  # keyed by stream, not by rank: any rank may load any stream
        return {**{f"data{m}": g.get_state() for m, g in zip(self.index, self.data)},
                **{f"torch{m}.{k}": v for m, state in self.torch.items() for k, v in state.items()}}

    def load_state_dict(self, state: dict):
        for m, g in zip(self.index, self.data):
            g.set_state(state[f"data{m}"])
        for m, rng in self.torch.items():
            self.torch[m] = {k: state[f"torch{m}.{k}"] for k in rng}


def global_rng() -> dict:
    """torch's global generators: the CPU's and the current GPU's (each rank draws on its own GPU)."""
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def set_global_rng(state: dict):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


def save_model(path: str, model: cv.DiT, text_encoder: wan.TextEncoder | None = None, **meta):
    """The DiT's weights, role (causal or not) and config; with the tiny text encoder also its weights
    (prefix "text_encoder."), so the file alone rebuilds both. Wan's UMT5 stays in its own directory.
    Every rank calls; the shards are gathered, rank 0 writes one file, the others wait for it."""
    tensors = dict(full_state_dict(model))
    if rank() == 0:
        if text_encoder is not None and model.cfg.text_encoder == "tiny":
            tensors.update({f"text_encoder.{k}": v for k, v in text_encoder.encoder.state_dict().items()})
        save_checkpoint(path, tensors, model.cfg, causal=model.causal, **meta)
    barrier()  # the file is whole before any rank reads it (stage 1 -> stage 2)


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
# ODE pairs on disk: written shard by shard, read lazily
# ------------------------------------------------------------------------------------------------


class ODEPairs:
    """The ODE pairs of Sec. 4.3: a directory of shards pairs_<i>.safetensors, each a batch of
    trajectories (n, Q+1, F, C, H, W) in the dtype the teacher computed in, with its prompts and the
    teacher's kind in its header. A shard is written whole (atomically), so a killed run resumes at
    the first missing one; reading takes only the rows and states asked for, so host memory does not
    grow with the number of pairs."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path, self.rows, self.prompts, self.teachers = path, [], [], set()
        names = sorted(n for n in os.listdir(path) if n.startswith("pairs_") and n.endswith(".safetensors")) \
            if os.path.isdir(path) else []
        for name in names:
            with safe_open(os.path.join(path, name), framework="pt") as f:
                meta = f.metadata()
            prompts = json.loads(meta["prompts"])
            self.prompts += prompts
            self.rows += [(os.path.join(path, name), j) for j in range(len(prompts))]
            self.teachers.add(json.loads(meta["teacher"]))
            self.cfg = cv.config_from_dict(json.loads(meta["config"]))

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, idx, state=slice(None)) -> torch.Tensor:
        """Trajectories idx -> (len(idx), Q+1, F, C, H, W) float32, or one state of each (state=-1:
        the end points, (len(idx), F, C, H, W)); only these bytes are read."""
        from safetensors import safe_open

        out = []
        for i in idx:
            path, j = self.rows[int(i)]
            with safe_open(path, framework="pt") as f:
                out.append(f.get_slice("trajectories")[j, state])
        return torch.stack(out).float()

    @staticmethod
    def shard(path: str, i: int) -> str:
        return os.path.join(path, f"pairs_{i:06d}.safetensors")


# ------------------------------------------------------------------------------------------------
# Training: optimizer step with a NaN guard, EMA, the resumable loop, flow-matching pre-training
# ------------------------------------------------------------------------------------------------


class NonFiniteError(cv.CausVidError):
    """A loss or gradient that is NaN or inf; the step that produced it was not applied."""


def backward(loss: torch.Tensor, scale: float = 1.0) -> float:
    """loss.backward(), scaled (1 / micro-batches), once the loss is known to be finite on every rank;
    -> the loss averaged over the ranks. A non-finite loss raises NonFiniteError and nothing is applied."""
    value = mean_over_ranks(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteError(f"the loss is {value}")
    (loss * scale if scale != 1 else loss).backward()
    return value


def apply_gradients(opt: torch.optim.Optimizer, params, clip: float, lr: float | None = None) -> float:
    """Clip, step, free the gradients; -> the gradient norm before clipping (over all ranks). A
    non-finite gradient raises NonFiniteError *before* the update: the weights stay the last good ones."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: the global norm
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        raise NonFiniteError(f"the gradient norm is {norm.item()}")
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)  # the gradients' memory goes back now, not at the next step
    return norm.item()


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params, clip: float, lr: float | None = None) -> float:
    """backward, clip, step for one batch; -> the gradient norm before clipping."""
    backward(loss)
    return apply_gradients(opt, params, clip, lr)


def adamw(params, lr: float, device, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW without weight decay; fused on CUDA (one kernel, no temporaries the size of the model)."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0, fused=True if device.type == "cuda" else None)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class EMA:
    """Exponential moving average of a model's parameters (the weights the toy teacher is sampled with)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module):
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v, 1 - self.decay) if v.dtype.is_floating_point else self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, state: dict):
        for k, v in state.items():
            self.shadow[k].copy_(v)


class TrainLoop:
    """What every training loop here shares so that no night of training is lost:

      with TrainLoop(path, cfg, steps, {"model": model, "opt": opt, "data": g}, resume) as loop:
          for step in loop:        # step = 0, 1, ... (from the saved step when resuming)
              ...one training step...

    * the state -- models, optimizers, EMA, random streams, torch.Generators, the global RNG, the step
      -- is saved every `save_every` steps, and on Ctrl-C (SIGINT) or SIGTERM (a cluster's
      preemption) after the step in progress, which then exits with code 128 + the signal (130, 143);
      a second Ctrl-C stops at once. The state is a torch.distributed.checkpoint directory `path`
      (each rank writes its shards; written beside it and renamed): a run saved on N ranks resumes on
      any number whose ranks x accumulate keep the global batch (DCP reshards, the streams are per
      micro-batch); the following steps' losses are those of a run never stopped;
    * a NonFiniteError (NaN/inf loss or gradient; nothing of that step is applied) stops training
      with one line naming the step and saves the last good state;
    * when all steps are done the state is deleted (the stage's checkpoint replaces it)."""

    def __init__(self, path: str, cfg: cv.Config, total: int, state: dict, resume: bool = False,
                 save_every: int = 500, desc: str = "training"):
        if "rng" in state:
            raise ValueError('"rng" is the name of the global RNG state; call yours something else')
        self.path, self.cfg, self.total, self.state = path, cfg, total, state
        self.save_every, self.desc, self.step, self.first_step, self._stop = save_every, desc, 0, 0, 0
        saved = [p for p in (path, f"{path}.old") if os.path.exists(os.path.join(p, "run.json"))]
        if resume and saved:  # (.old: a save killed between its two renames)
            self._load(saved[0])
            self.first_step = self.step
            print(f"resuming {desc} from {saved[0]} at step {self.step}")
        elif resume:
            print(f"--resume: no saved state at {path}; {desc} starts from step 0")

    def _state_dict(self, optimizers) -> dict:
        """Everything to save, as DCP state dicts (models and optimizers by parameter name, resharded on
        load); of the optimizers only those that have stepped (DCP would step the others, at lr 0, to
        give them a state); stream 0's global RNG on rank 0."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        out = {}
        for name, obj in self.state.items():
            if isinstance(obj, nn.Module):
                out[name] = get_model_state_dict(obj)
            elif isinstance(obj, torch.optim.Optimizer):
                if name in optimizers:
                    out[name] = get_optimizer_state_dict(self._model_of(obj), obj)
            else:
                out[name] = {"state": obj.get_state()} if isinstance(obj, torch.Generator) else obj.state_dict()
        return {**out, **({"rng": global_rng()} if rank() == 0 else {})}

    def _model_of(self, opt: torch.optim.Optimizer) -> nn.Module:
        first = opt.param_groups[0]["params"][0]
        return next(m for m in self.state.values() if isinstance(m, nn.Module) and any(p is first for p in m.parameters()))

    def _save(self):
        import torch.distributed.checkpoint as dcp

        tmp, old = f"{self.path}.tmp", f"{self.path}.old"
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        stepped = [n for n, o in self.state.items() if isinstance(o, torch.optim.Optimizer) and o.state]
        dcp.save(self._state_dict(stepped), checkpoint_id=tmp, no_dist=world() == 1)
        if rank() == 0:
            with open(os.path.join(tmp, "run.json"), "w") as f:  # what it was saved with, as JSON
                json.dump({"step": self.step, "ranks": world(), "optimizers": stepped, "config": asdict(self.cfg)}, f)
            shutil.rmtree(old, ignore_errors=True)
            if os.path.exists(self.path):
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        barrier()

    def _load(self, path: str):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        with open(os.path.join(path, "run.json")) as f:
            saved = json.load(f)
        cfg = cv.config_from_dict(saved["config"])
        diff = {f.name: (getattr(cfg, f.name), getattr(self.cfg, f.name)) for f in fields(cv.Config)
                if f.name != "accumulate" and getattr(cfg, f.name) != getattr(self.cfg, f.name)}
        if diff:
            raise cv.CausVidError(f"{path!r} was saved with another config ({diff}, saved vs now); "
                                  "resume with the same flags, or delete it to start over")
        if saved["ranks"] * cfg.accumulate != world() * self.cfg.accumulate:
            raise cv.CausVidError(f"{path!r} was saved by {saved['ranks']} rank(s) x accumulate {cfg.accumulate}; "
                                  f"resume with ranks x accumulate = {saved['ranks'] * cfg.accumulate} (the same global "
                                  f"batch), e.g. --set accumulate={saved['ranks'] * cfg.accumulate // world()} on "
                                  f"{world()} rank(s)")
        state = self._state_dict(saved["optimizers"])
        dcp.load(state, checkpoint_id=path, no_dist=world() == 1)
        for name, obj in self.state.items():
            if isinstance(obj, nn.Module):
                set_model_state_dict(obj, state[name])
            elif isinstance(obj, torch.optim.Optimizer):
                if name in state:  # (one that had not stepped was saved without a state: it stays fresh)
                    set_optimizer_state_dict(self._model_of(obj), obj, state[name])
            else:
                obj.set_state(state[name]["state"]) if isinstance(obj, torch.Generator) else obj.load_state_dict(state[name])
        if rank() == 0:
            set_global_rng(state["rng"])
        self.step = saved["step"]

    def __enter__(self):
        def on_signal(signum, frame):
            if self._stop and signum == signal.SIGINT:  # a second Ctrl-C: stop now (a scheduler's
                raise KeyboardInterrupt                 # repeated SIGTERMs still wait for the save)
            self._stop = self._stop or signum
            tqdm.write(f"{signal.Signals(signum).name}: stopping after step {self.step + 1}, saving {self.path} "
                       "(Ctrl-C again to quit now)")

        main = threading.current_thread() is threading.main_thread()
        self._old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        return self

    def __iter__(self):
        for step in tqdm(range(self.step, self.total), desc=self.desc, initial=self.step, total=self.total,
                         disable=rank() > 0):
            yield step
            self.step = step + 1
            if world() > 1:  # all ranks stop after the same step
                stop = torch.tensor(float(self._stop))
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)
                self._stop = int(stop)
            if self._stop:
                self._save()
                tqdm.write(f"interrupted: saved {self.path} at step {self.step}; continue with --resume")
                raise SystemExit(128 + self._stop)
            if self.step % self.save_every == 0 and self.step < self.total:
                self._save()

    def __exit__(self, kind, error, tb):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        if isinstance(error, NonFiniteError):
            self._save()
            raise NonFiniteError(f"{self.desc} stopped at step {self.step + 1}: {error}; nothing of that step "
                                 f"was applied and the last good state (after step {self.step}) is in {self.path} "
                                 "-- lower the learning rate or clip harder, and continue with --resume") from None
        if error is None and self.step >= self.total and rank() == 0:
            shutil.rmtree(self.path, ignore_errors=True)
        return False


def log(stage: str, step: int, total: int, t0: float, record: str | None = None, shown=None, **values):
    """One line per log step: `ode step 100/600 | loss 0.031 | grad_norm 0.4 | 48 s`, of the values
    named in `shown` (default: all); record: a file to which all of them go as one JSON line."""
    items = " | ".join(f"{k} {v:.4g}" for k, v in values.items() if shown is None or k in shown)
    tqdm.write(f"{stage} step {step}/{total} | {items} | {time.time() - t0:.0f} s")
    if record and rank() == 0:
        with open(record, "a") as f:
            f.write(json.dumps({"iteration": step, "seconds": round(time.time() - t0, 1), **values}) + "\n")


@torch.no_grad()
def dmd_diagnostics(x0, t_in, grad, t, real, critic, text, timesteps, chunk_size: int) -> dict:
    """What DMD sees on one batch of generator samples x0 (B, F, C, H, W), made from steps t_in (B, F),
    with DMD's normalised gradient `grad` on them at its noise level t (B, F) (docs/experiments.md):
      critic_fm, teacher_fm  the flow-matching loss (Eq. 2) of the critic (s_gen) and of the frozen teacher
                             (s_data, conditional) on the same samples, fresh noise and the same t: the
                             critic knows the generator's distribution while its loss is the lower one;
      grad_chunk<i>          root-mean-square of the gradient on chunk i;
      grad_step<j>           the same over the chunks the generator made from student step j, and
      grad_clean             over the chunks it was given clean (context: their gradient moves nothing)."""
    eps = torch.randn_like(x0)
    x_t, target = cv.add_noise(x0, eps, t), (eps - x0).float()
    out = {"critic_fm": F.mse_loss(critic(x_t, t, text).float(), target).item(),
           "teacher_fm": F.mse_loss(real(x_t, t, text).float(), target).item()}
    power = grad.float().pow(2).flatten(2).mean(2)  # (B, F)
    for i, chunk in enumerate(power.split(chunk_size, 1)):
        out[f"grad_chunk{i}"] = chunk.mean().sqrt().item()
    for name, step in [*((f"grad_step{j}", t) for j, t in enumerate(timesteps.tolist())), ("grad_clean", 0.0)]:
        out[name] = power[t_in == step].mean().sqrt().item()  # NaN where no chunk was made from that step
    return out


def local_parameters(model: nn.Module) -> list[torch.Tensor]:
    """fp32 CPU copies of the model's weights (under FSDP2: of this rank's shards; its state_dict is
    sharded even where a forward left the parameters gathered)."""
    return [(p.to_local() if hasattr(p, "to_local") else p).detach().to("cpu", torch.float32, copy=True)
            for p in model.state_dict().values()]


def distance_from(model: nn.Module, init: list[torch.Tensor]) -> float:
    """||phi - phi_init|| / ||phi_init||: how far the generator has moved from init = local_parameters(it)
    taken at the start (its stage-1 weights)."""
    moved = sum(float((p - p0).pow(2).sum()) for p, p0 in zip(local_parameters(model), init))
    return math.sqrt(mean_over_ranks(moved) / mean_over_ranks(sum(float(p0.pow(2).sum()) for p0 in init)))


def interval_means(logs: dict[str, list[float]]) -> dict[str, float]:
    """The mean of every value logged since the last log line; a value that was NaN every time (no
    chunk made from that student step) is left out. Empties `logs`."""
    means = {k: float(torch.tensor(v, dtype=torch.float64).nanmean()) for k, v in logs.items()}
    logs.clear()
    return {k: v for k, v in means.items() if not math.isnan(v)}


def nanmean_over_ranks(values: list[float]) -> float:
    """The mean of this rank's values and every other rank's, NaNs left out (NaN if all are)."""
    v = torch.tensor(values, dtype=torch.float64)
    count = mean_over_ranks((~v.isnan()).sum())
    return mean_over_ranks(v.nansum()) / count if count else math.nan


def train_flow_matching(model: cv.DiT, text_encoder, cfg: cv.Config, path: str, steps: int, lr: float, device,
                        seed: int, stage: str, ema_decay: float | None = None, teacher_forcing: bool = False,
                        resume: bool = False, save_every: int = 500, log_every: int = 100) -> cv.DiT:
    """The one flow-matching training loop (Eq. 2) on the toy world, for the models that exist before
    CausVid starts: the bidirectional teacher (one t per clip; a stand-in for a pretrained video model)
    and, with teacher_forcing, causal_ode_init's causal teacher (block-causal, one noisy chunk after
    clean ones: cv.teacher_forcing_loss). Chunk c is drawn with probability proportional to 1 / (c + 1):
    every chunk gets the same share of the compute, and chunk 0 -- no context, the prompt alone sets its
    motion -- about half of the steps. Shifted logit-normal timesteps; cfg_dropout empty prompts, so CFG
    works; warm-up + cosine learning rate; EMA if ema_decay. Trains `model` in place and saves it (EMA
    weights if any) to `path`."""
    if world() > 1:
        raise cv.CausVidError(f"train the {stage} model in one process (python, not torchrun), then run torchrun again")
    emb = embed_prompts(text_encoder, toy.PROMPTS + [""])
    ema = EMA(model, ema_decay) if ema_decay else None
    opt = adamw(model.parameters(), lr, device, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(seed)
    t0, B, Fr, K = time.time(), cfg.batch_size, cfg.num_frames, cfg.chunk_size
    state = {"model": model, "opt": opt, "data": g, **({"ema": ema} if ema else {})}
    with TrainLoop(path.replace(".safetensors", "_state"), cfg, steps, state, resume, save_every,
                   f"{stage} training") as loop:
        for step in loop:
            x0, prompts = toy.toy_batch(B, Fr, g)
            drop = torch.rand(B, generator=g) < cfg.cfg_dropout
            text = stack_text(emb, ["" if d else p for p, d in zip(prompts, drop)], device)
            t = cv.shift_timesteps(torch.sigmoid(torch.randn(B, 1, generator=g)) * 1000, cfg.shift).to(device)
            with autocast(device, training=True):
                if teacher_forcing:  # one chunk per step; chunk c costs c + 1 chunks' compute, so P ~ 1 / (c + 1)
                    chunk = int(torch.multinomial(1 / torch.arange(1.0, Fr // K + 1), 1, generator=g))
                    loss = cv.teacher_forcing_loss(model, x0.to(device), t[:, 0], text, chunk, K)
                else:
                    loss = cv.flow_matching_loss(model, x0.to(device), t.expand(B, Fr), text)
            norm = optimizer_step(loss, opt, model.parameters(), cfg.grad_clip, lr_at(step, steps, lr, cfg.warmup))
            if ema:
                ema.update(model)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                log(stage, step + 1, steps, t0, loss=loss.item(), grad_norm=norm)
        if ema:
            model.load_state_dict(ema.shadow)
        save_model(path, model.eval(), text_encoder, stage=stage, steps=steps)  # before the state is dropped
    print(f"wrote {path}")
    return model


# ------------------------------------------------------------------------------------------------
# Sampling: one front end for the teacher, the causal diffusion baseline and the student
# ------------------------------------------------------------------------------------------------


def chunk_rng(seed: int, chunk: int, stream: int, device) -> torch.Generator:
    """The random stream of one chunk (stream 0: its starting noise; 1: its re-noising, Alg. 2 line
    8), on `device`. It depends on the seed and the chunk's index only, so extending a video never
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


def stream_video(model, kind: str, text, cfg: cv.Config, num_frames: int, seed: int, device, uncond=None,
                 context=None, video=None, start: int = 0, window=None, sink=None, use_cache: bool = True, vae=None,
                 batch: int = 64) -> Iterator[torch.Tensor]:
    """Videos from every kind of model, yielded as they are made: chunk by chunk (N, K, C, H, W), float
    on the CPU, for the streaming student; whole for the teachers.
      "teacher"  the bidirectional model: Euler + CFG over the whole clip (sample_ode)
      "causal"   a causal diffusion model: Euler + CFG chunk by chunk with the KV cache (sample_ode_causal)
      "student"  CausVid's streaming generator (Alg. 2; recompute_generate with use_cache=False)
    text (N, L, D_text) or one such tensor per chunk; context (N, F_c, ...) clean frames before the
    video (I2V), yielded first; video (N, F, ...) inputs noised chunk by chunk to student step `start`
    (V2V; pixels with a vae, encoded chunk by chunk as the stream reaches them); window, sink: see
    stream_generate; vae decodes each chunk as it is made. The N videos run in batches of `batch`
    (from row i on with seed + i), advanced together: chunk c of every video is out before chunk c + 1
    is made. A chunk's noise (chunk_rng) is drawn when the stream reaches it: nothing here grows with
    the video's length."""
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
    p.add_argument("--run-dir", dest="run", help="the run directory: checkpoints are read from and written to it "
                                 "(default: runs/<config>)")
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


def add_training_args(p):
    """The flags both training scripts share (train_dmd.py runs stage 1 first when it is missing)."""
    p.add_argument("--teacher", help="the bidirectional teacher checkpoint (default: <run>/teacher.safetensors; "
                                     "with --model-dir the Wan directory itself)")
    p.add_argument("--teacher-steps", type=int, help="toy world: pre-train the teacher for this many steps if "
                                                     "there is none (default: the preset's teacher_train_steps)")
    p.add_argument("--causal-teacher-steps", type=int, help="toy world, causal_ode_init: train the causal teacher "
                   "for this many steps if the run has none (default: the one shipped in weights/)")
    p.add_argument("--pairs", type=int, help="number of ODE pairs (default: the preset's ode_pairs)")
    p.add_argument("--prompts", help="prompt file, one per line, for the ODE pairs (default: the 48 toy "
                                     "prompts; required for Wan)")
    p.add_argument("--exact-teacher", action="store_true", help="toy world: the world's exact denoiser plays the "
                                                                "teacher (ODE pairs, DMD's real score)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from <run>/<stage>_state/"
                                                         "(models, optimizers, step, RNG)")
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
               ("causal_teacher_steps", "causal_teacher_steps"),
               ("ode_steps", "ode_steps"), ("dmd_steps", "dmd_steps")]


def resolve(args) -> tuple[cv.Config, torch.device, str]:
    """-> (config, device, run directory), from the common flags: the preset, then the flags that set
    a field, then --set, then the Wan directory's shapes and paths."""
    if args.tiny and args.config not in (None, "tiny"):
        raise cv.CausVidError(f"--tiny and --config {args.config} contradict each other; give one")
    name = "tiny" if args.tiny else args.config
    if name is None:
        raise cv.CausVidError("choose a preset: --tiny (toy world, CPU) or --config wan2.1-t2v-1.3b")
    overrides = {f: getattr(args, dest) for dest, f in FLAG_FIELDS if getattr(args, dest, None) is not None}
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
    """The one place that says where the bidirectional teacher comes from: --teacher; else the run's own
    teacher.safetensors; else the official Wan directory (--model-dir); else, on the toy world, the
    teacher shipped in weights/ -- unless --teacher-steps asks for one pre-trained into the run."""
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
    """Where causal_ode_init's causal teacher comes from: the run's causal_diffusion.safetensors; else, on
    the toy world, the one shipped in weights/ -- unless --causal-teacher-steps asks for one trained into
    the run."""
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
