"""What the two training scripts share and the method does not need: many GPUs (torchrun, FSDP2),
the random streams of each micro-batch, the ODE pairs on disk, the guarded optimizer step, the
resumable loop, the logs and DMD's diagnostics, and the one flow-matching pre-training loop of the
models that exist before CausVid starts. Nothing here is CausVid; causvid.py is. (utils.py: what
sampling shares too.)
"""

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import causvid as cv
import utils

# DCP says on every save and load without a process group that it assumes one process: it is right
warnings.filterwarnings("ignore", message="torch.distributed is .*single process")

# ------------------------------------------------------------------------------------------------
# Many GPUs: torchrun and FSDP2. In one process every helper here is a no-op.
# ------------------------------------------------------------------------------------------------


def backend(device: torch.device) -> str:
    """The process group's backends: on GPUs NCCL for CUDA tensors beside gloo for the CPU ones (the
    logged losses, the stop flag), so no collective here needs to know where its tensor lives."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): join the process group (one GPU per process, the local
    rank's) and silence the other ranks' prints (rank 0 logs). -> the device. The timeout (1 h,
    NCCL's default is 10 min) covers the longest any rank waits for the others: rank 0 writing a Wan
    checkpoint, the last ODE-pair shards."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend(device),
            timeout=timedelta(hours=1),
            device_id=device if device.type == "cuda" else None,
        )
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
    """FSDP2's precision: on GPUs the gathered weights in bf16 (what autocast computes in anyway:
    half the all-gather) and the gradients reduced in fp32; the inputs are left as they are (FSDP2
    would cast the timesteps to bf16: 757 -> 756) and autocast picks each op's dtype. On CPUs fp32
    throughout."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
    )


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 (torch.distributed.fsdp.fully_shard): each DiT block, then the rest, split over the
    ranks, gathered per block as the forward reaches it and let go after it (the official release
    also wraps per block); the rest too, which FSDP2 keeps gathered after a forward without grad:
    the EMA reads shards."""
    if world() > 1:
        from torch.distributed.fsdp import fully_shard

        policy = mixed_precision(next(model.parameters()).device)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy, reshard_after_forward=True)
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


def micro_batches(streams: "Streams", model: nn.Module) -> Iterator[torch.Generator]:
    """Gradient accumulation in one loop: for each of this rank's micro-batches, its random streams
    (yields its data generator; torch's global one is switched to its state) and, on the last one
    only, the gradient reduction over the ranks."""
    A = len(streams.index)
    for a in range(A):
        with streams.use(a) as rng, gradient_sync(model, a + 1 == A):
            yield rng


def mean_over_ranks(value) -> float:
    """A number averaged over the ranks (the loss every rank logs and checks)."""
    value = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if world() > 1:
        dist.all_reduce(value)
        value = value / world()
    return value.item()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, gathered from the ranks' shards
    (on rank 0; every rank calls)."""
    if world() == 1:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def save_model(path: str, model: cv.DiT, text_encoder=None, **meta):
    """The DiT's weights, role (causal or not) and config; with the tiny text encoder also its
    weights (prefix "text_encoder."), so the file alone rebuilds both. Wan's UMT5 stays in its own
    directory. Every rank calls; the shards are gathered, rank 0 writes one file, the others wait
    for it."""
    tensors = dict(full_state_dict(model))
    if rank() == 0:
        if text_encoder is not None and model.cfg.text_encoder == "tiny":
            tensors.update(
                {f"text_encoder.{k}": v for k, v in text_encoder.encoder.state_dict().items()}
            )
        utils.save_checkpoint(path, tensors, model.cfg, causal=model.causal, **meta)
    barrier()  # the file is whole before any rank reads it (stage 1 -> stage 2)


class Streams:
    """The random streams of this rank's micro-batches. Micro-batch m of the global batch
    (m = rank x accumulate + a) draws its data from generator m and the noise and timesteps drawn
    inside causvid's functions from torch's global generator in state m. Stream 0 is the process's
    own global state, so one process with accumulate 1 is the plain loop; the others are seeded from
    (seed, m). Any split of the global batch over ranks and accumulation draws the same numbers:
    N ranks x A micro-batches log the losses of one process with N x A, and a run saved on one split
    resumes on another."""

    def __init__(self, seed: int, accumulate: int):
        self.seed, self.index = seed, [rank() * accumulate + a for a in range(accumulate)]
        self.data = [torch.Generator().manual_seed(self.stream_seed(m)) for m in self.index]
        outer, self.torch = global_rng(), {}  # torch's global states of streams m > 0
        for m in self.index[1 if self.index[0] == 0 else 0 :]:
            torch.manual_seed(self.stream_seed(m))
            self.torch[m] = global_rng()
        set_global_rng(outer)

    def stream_seed(self, m: int) -> int:
        return self.seed if m == 0 else self.seed * 1_000_003 + m

    @contextlib.contextmanager
    def use(self, a: int):
        """Draw from micro-batch a's streams: yields its data generator,
        switches torch's global one."""
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
        return {
            **{f"data{m}": g.get_state() for m, g in zip(self.index, self.data)},
            **{f"torch{m}.{k}": v for m, state in self.torch.items() for k, v in state.items()},
        }

    def load_state_dict(self, state: dict):
        for m, g in zip(self.index, self.data):
            g.set_state(state[f"data{m}"])
        for m, rng in self.torch.items():
            self.torch[m] = {k: state[f"torch{m}.{k}"] for k in rng}


def global_rng() -> dict:
    """torch's global generators: the CPU's and the current GPU's
    (each rank draws on its own GPU)."""
    return {
        "cpu": torch.get_rng_state(),
        **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
    }


def set_global_rng(state: dict):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------
# ODE pairs on disk: written shard by shard, read lazily
# ------------------------------------------------------------------------------------------------


class ODEPairs:
    """The ODE pairs of Sec. 4.3: a directory of shards pairs_<i>.safetensors, each a batch of
    trajectories (n, Q+1, F, C, H, W) (bf16 on a GPU, else fp32), with its prompts, the teacher's
    kind and its number of Euler steps in its header. A shard is written whole (atomically), so a
    killed run resumes at the first missing one; reading takes only the rows and states asked for,
    so host memory does not grow with the number of pairs."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path, self.rows, self.prompts, self.teachers = path, [], [], set()
        self.euler_steps = set()  # the teacher's steps that made them (ode_pair_stride)
        names = (
            sorted(
                n for n in os.listdir(path) if n.startswith("pairs_") and n.endswith(".safetensors")
            )
            if os.path.isdir(path)
            else []
        )
        for name in names:
            with safe_open(os.path.join(path, name), framework="pt") as f:
                meta = f.metadata()
            prompts = json.loads(meta["prompts"])
            self.prompts += prompts
            self.rows += [(os.path.join(path, name), j) for j in range(len(prompts))]
            self.teachers.add(json.loads(meta["teacher"]))
            self.cfg = cv.config_from_dict(json.loads(meta["config"]))
            # (shards made before ode_pair_stride took every step of the teacher's schedule)
            self.euler_steps.add(json.loads(meta.get("euler_steps", str(self.cfg.teacher_steps))))

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
# Training: optimizer step with a NaN guard, schedules, EMA, the resumable loop,
# flow-matching pre-training
# ------------------------------------------------------------------------------------------------


class NonFiniteError(cv.CausVidError):
    """A loss or gradient that is NaN or inf; the step that produced it was not applied."""


def backward(loss: torch.Tensor, scale: float = 1.0) -> float:
    """loss.backward(), scaled (1 / micro-batches), once the loss is known to be finite on every
    rank; -> the loss averaged over the ranks. A non-finite loss raises NonFiniteError and nothing
    is applied."""
    value = mean_over_ranks(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteError(f"the loss is {value}")
    (loss * scale if scale != 1 else loss).backward()
    return value


def apply_gradients(opt: torch.optim.Optimizer, params, clip: float) -> float:
    """Clip, step, free the gradients; -> the gradient norm before clipping (over all ranks). A
    non-finite gradient raises NonFiniteError *before* the update:
    the weights stay the last good ones."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: the global norm
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        raise NonFiniteError(f"the gradient norm is {norm.item()}")
    opt.step()
    opt.zero_grad(set_to_none=True)  # the gradients' memory goes back now, not at the next step
    return norm.item()


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params, clip: float) -> float:
    """backward, clip, step for one batch; -> the gradient norm before clipping."""
    backward(loss)
    return apply_gradients(opt, params, clip)


def adamw(params, lr: float, device, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW without weight decay; fused on CUDA
    (one kernel, no temporaries the size of the model)."""
    return torch.optim.AdamW(
        params, lr=lr, betas=betas, weight_decay=0.0, fused=True if device.type == "cuda" else None
    )


def warmup_cosine(opt: torch.optim.Optimizer, total: int, warmup: int):
    """The learning rate: linear warm-up to the optimizer's own over `warmup` steps, then cosine
    decay to 0 at `total` (torch's schedulers; call .step() after each optimizer step)."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    decay = CosineAnnealingLR(opt, max(1, total - warmup))
    if warmup == 0:
        return decay
    return SequentialLR(
        opt, [LinearLR(opt, 1 / warmup, total_iters=warmup - 1), decay], [warmup]
    )  # s: (s + 1) / warmup


def ema(model: nn.Module, decay: float) -> nn.Module:
    """An exponential moving average of `model`'s weights, torch's AveragedModel: its first
    update_parameters(model) copies them, each later one moves it 1 - decay of the way. Under
    torchrun it is sharded as shard(model) will be; make it before that (FSDP2's modules cannot be
    copied)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    shard(average.module)
    return average


class TrainLoop:
    """What every training loop here shares so that no night of training is lost:

      with TrainLoop(path, cfg, steps, {"model": model, "opt": opt, "data": g}, resume) as loop:
          for step in loop:        # step = 0, 1, ... (from the saved step when resuming)
              ...one training step...

    * the state -- models, optimizers, schedules, EMA, random streams, torch.Generators, the global
      RNG, the step -- is saved every `save_every` steps, and on Ctrl-C (SIGINT) or SIGTERM (a
      cluster's preemption) after the step in progress, which then exits with code 128 + the signal
      (130, 143); a second Ctrl-C stops at once. The state is a torch.distributed.checkpoint
      directory `path` (each rank writes its shards; written beside it and renamed): a run saved on
      N ranks resumes on any number whose ranks x accumulate keep the global batch (DCP reshards,
      the streams are per micro-batch); the following steps' losses are those of a run never
      stopped;
    * a NonFiniteError (NaN/inf loss or gradient; nothing of that step is applied) stops training
      with one line naming the step and saves the last good state;
    * when all steps are done the state is deleted (the stage's checkpoint replaces it)."""

    def __init__(
        self,
        path: str,
        cfg: cv.Config,
        total: int,
        state: dict,
        resume: bool = False,
        save_every: int = 500,
        desc: str = "training",
    ):
        if "rng" in state:
            raise ValueError('"rng" is the name of the global RNG state; call yours something else')
        self.path, self.cfg, self.total, self.state = path, cfg, total, state
        self.save_every = save_every
        self.desc = desc
        self.step = 0
        self.first_step = 0
        self._stop = 0
        saved = [p for p in (path, f"{path}.old") if os.path.exists(os.path.join(p, "run.json"))]
        if resume and saved:  # (.old: a save killed between its two renames)
            self._load(saved[0])
            self.first_step = self.step
            print(f"resuming {desc} from {saved[0]} at step {self.step}")
        elif resume:
            print(f"--resume: no saved state at {path}; {desc} starts from step 0")

    def _state_dict(self, optimizers) -> dict:
        """Everything to save, as DCP state dicts (models and optimizers by parameter name,
        resharded on load); of the optimizers only those that have stepped (DCP would step the
        others, at lr 0, to give them a state); stream 0's global RNG on rank 0."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        out = {}
        for name, obj in self.state.items():
            if isinstance(obj, nn.Module):
                out[name] = get_model_state_dict(obj)
            elif isinstance(obj, torch.optim.Optimizer):
                if name in optimizers:
                    out[name] = get_optimizer_state_dict(self._model_of(obj), obj)
            else:
                out[name] = (
                    {"state": obj.get_state()}
                    if isinstance(obj, torch.Generator)
                    else obj.state_dict()
                )
        return {**out, **({"rng": global_rng()} if rank() == 0 else {})}

    def _model_of(self, opt: torch.optim.Optimizer) -> nn.Module:
        first = opt.param_groups[0]["params"][0]
        return next(
            m
            for m in self.state.values()
            if isinstance(m, nn.Module) and any(p is first for p in m.parameters())
        )

    def _save(self):
        import torch.distributed.checkpoint as dcp

        tmp, old = f"{self.path}.tmp", f"{self.path}.old"
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        stepped = [
            n for n, o in self.state.items() if isinstance(o, torch.optim.Optimizer) and o.state
        ]
        dcp.save(self._state_dict(stepped), checkpoint_id=tmp, no_dist=world() == 1)
        if rank() == 0:
            with open(os.path.join(tmp, "run.json"), "w") as f:  # what it was saved with, as JSON
                json.dump(
                    {
                        "step": self.step,
                        "ranks": world(),
                        "optimizers": stepped,
                        "config": asdict(self.cfg),
                    },
                    f,
                )
            shutil.rmtree(old, ignore_errors=True)
            if os.path.exists(self.path):
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        barrier()

    def _load(self, path: str):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        with open(os.path.join(path, "run.json")) as f:
            saved = json.load(f)
        cfg = cv.config_from_dict(saved["config"])
        diff = {
            f.name: (getattr(cfg, f.name), getattr(self.cfg, f.name))
            for f in fields(cv.Config)
            if f.name != "accumulate" and getattr(cfg, f.name) != getattr(self.cfg, f.name)
        }
        if diff:
            raise cv.CausVidError(
                f"{path!r} was saved with another config ({diff}, saved vs now); "
                "resume with the same flags, or delete it to start over"
            )
        if saved["ranks"] * cfg.accumulate != world() * self.cfg.accumulate:
            raise cv.CausVidError(
                f"{path!r} was saved by {saved['ranks']} rank(s) x accumulate {cfg.accumulate}; "
                f"resume with ranks x accumulate = {saved['ranks'] * cfg.accumulate} "
                "(the same global batch), "
                f"e.g. --set accumulate={saved['ranks'] * cfg.accumulate // world()} on "
                f"{world()} rank(s)"
            )
        state = self._state_dict(saved["optimizers"])
        dcp.load(state, checkpoint_id=path, no_dist=world() == 1)
        for name, obj in self.state.items():
            if isinstance(obj, nn.Module):
                set_model_state_dict(obj, state[name])
            elif isinstance(obj, torch.optim.Optimizer):
                # (one that had not stepped was saved without a state: it stays fresh)
                if name in state:
                    set_optimizer_state_dict(self._model_of(obj), obj, state[name])
            elif isinstance(obj, torch.Generator):
                obj.set_state(state[name]["state"])
            else:
                obj.load_state_dict(state[name])
        if rank() == 0:
            set_global_rng(state["rng"])
        self.step = saved["step"]

    def __enter__(self):
        def on_signal(signum, frame):
            if self._stop and signum == signal.SIGINT:  # a second Ctrl-C: stop now (a scheduler's
                raise KeyboardInterrupt  # repeated SIGTERMs still wait for the save)
            self._stop = self._stop or signum
            tqdm.write(
                f"{signal.Signals(signum).name}: stopping after step {self.step + 1}, "
                f"saving {self.path} (Ctrl-C again to quit now)"
            )

        main = threading.current_thread() is threading.main_thread()
        self._old = (
            {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            if main
            else {}
        )
        return self

    def __iter__(self):
        for step in tqdm(
            range(self.step, self.total),
            desc=self.desc,
            initial=self.step,
            total=self.total,
            disable=rank() > 0,
        ):
            yield step
            self.step = step + 1
            if world() > 1:  # all ranks stop after the same step
                stop = torch.tensor(float(self._stop))
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)
                self._stop = int(stop)
            if self._stop:
                self._save()
                tqdm.write(
                    f"interrupted: saved {self.path} at step {self.step}; continue with --resume"
                )
                raise SystemExit(128 + self._stop)
            if self.step % self.save_every == 0 and self.step < self.total:
                self._save()

    def __exit__(self, kind, error, tb):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        if isinstance(error, NonFiniteError):
            self._save()
            raise NonFiniteError(
                f"{self.desc} stopped at step {self.step + 1}: {error}; nothing of that step "
                f"was applied and the last good state (after step {self.step}) is in {self.path} "
                "-- lower the learning rate or clip harder, and continue with --resume"
            ) from None
        if error is None and self.step >= self.total and rank() == 0:
            shutil.rmtree(self.path, ignore_errors=True)
        return False


def log(
    stage: str, step: int, total: int, t0: float, record: str | None = None, shown=None, **values
):
    """One line per log step: `ode step 100/600 | loss 0.031 | grad_norm 0.4 | 48 s`, of the values
    named in `shown` (default: all); record: a file to which all of them go as one JSON line."""
    items = " | ".join(f"{k} {v:.4g}" for k, v in values.items() if shown is None or k in shown)
    tqdm.write(f"{stage} step {step}/{total} | {items} | {time.time() - t0:.0f} s")
    if record and rank() == 0:
        with open(record, "a") as f:
            f.write(
                json.dumps({"iteration": step, "seconds": round(time.time() - t0, 1), **values})
                + "\n"
            )


@torch.no_grad()
def dmd_diagnostics(x0, t_in, grad, t, real, critic, text, timesteps, chunk_size: int) -> dict:
    """What DMD sees on one batch of generator samples x0 (B, F, C, H, W), made from steps t_in
    (B, F), with DMD's normalised gradient `grad` on them at its noise level t (B, F)
    (docs/experiments.md):
      critic_fm, teacher_fm  the flow-matching loss (Eq. 2) of the critic (s_gen) and of the frozen
                             teacher (s_data, conditional) on the same samples, fresh noise and the
                             same t: the critic knows the generator's distribution while its loss is
                             the lower one;
      grad_chunk<i>          root-mean-square of the gradient on chunk i;
      grad_step<j>           the same over the chunks the generator made from student step j, and
      grad_clean             over the chunks it was given clean (context: their gradient moves
                             nothing)."""
    eps = torch.randn_like(x0)
    x_t, target = cv.add_noise(x0, eps, t), (eps - x0).float()
    out = {
        "critic_fm": F.mse_loss(critic(x_t, t, text).float(), target).item(),
        "teacher_fm": F.mse_loss(real(x_t, t, text).float(), target).item(),
    }
    power = grad.float().pow(2).flatten(2).mean(2)  # (B, F)
    for i, chunk in enumerate(power.split(chunk_size, 1)):
        out[f"grad_chunk{i}"] = chunk.mean().sqrt().item()
    for name, step in [
        *((f"grad_step{j}", t) for j, t in enumerate(timesteps.tolist())),
        ("grad_clean", 0.0),
    ]:
        # NaN where no chunk was made from that step
        out[name] = power[t_in == step].mean().sqrt().item()
    return out


def local_parameters(model: nn.Module) -> list[torch.Tensor]:
    """fp32 CPU copies of the model's weights (under FSDP2: of this rank's shards; its state_dict is
    sharded even where a forward left the parameters gathered)."""
    return [
        (p.to_local() if hasattr(p, "to_local") else p).detach().to("cpu", torch.float32, copy=True)
        for p in model.state_dict().values()
    ]


def distance_from(model: nn.Module, init: list[torch.Tensor]) -> float:
    """||phi - phi_init|| / ||phi_init||: how far the generator has moved from
    init = local_parameters(it) taken at the start (its stage-1 weights)."""
    moved = sum(float((p - p0).pow(2).sum()) for p, p0 in zip(local_parameters(model), init))
    return math.sqrt(
        mean_over_ranks(moved) / mean_over_ranks(sum(float(p0.pow(2).sum()) for p0 in init))
    )


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


def mean_logs(logs: list[dict]) -> dict[str, float]:
    """One dict of the means, over micro-batches and ranks, of the values logged in each."""
    if not logs:
        return {}
    return {k: nanmean_over_ranks([log[k] for log in logs]) for k in logs[0]}


@dataclass
class LoopFlags:
    """How a training loop saves and logs: the scripts' --resume, --save-every and --log-every."""

    resume: bool = False
    save_every: int = 500
    log_every: int = 100

    @classmethod
    def of(cls, args) -> "LoopFlags":
        return cls(args.resume, args.save_every, args.log_every)


@dataclass
class Pretraining:
    """A model trained with flow matching before CausVid starts, where no pretrained one exists:
    the toy world's bidirectional teacher (a stand-in for a pretrained video model), or Causal
    Forcing's causal teacher (successors.teacher_forcing_step)."""

    stage: str  # its name in the logs
    steps: int
    lr: float  # peak; linear warm-up, cosine decay
    seed: int
    loss: Callable  # (model, x0 (B, F, C, H, W), t (B,), text, rng) -> the loss


def clip_flow_matching(model, x0, t, text, rng):
    """The bidirectional teacher's loss (Eq. 2): one t per clip, every frame at it."""
    return cv.flow_matching_loss(model, x0, t[:, None].expand(-1, x0.shape[1]), text)


def train_flow_matching(model, text_encoder, job: Pretraining, data, path: str, flags: LoopFlags):
    """The one flow-matching training loop, on the clips of a world (data: toy_world.ToyWorld, its
    clips(B, rng) -> (x0, prompts), prompts, config and device): shifted logit-normal timesteps;
    cfg_dropout empty prompts, so that CFG works; warm-up + cosine learning rate; EMA of
    cfg.ema_decay. Trains `model` in place and saves it (the EMA weights) to `path` with its text
    encoder."""
    if world() > 1:
        raise cv.CausVidError(
            f"train the {job.stage} model in one process (python, not torchrun), "
            "then run torchrun again"
        )
    cfg = data.cfg
    device = data.device
    emb = text_encoder.embed(list(data.prompts) + [""])
    average = ema(model, cfg.ema_decay) if cfg.ema_decay else None
    opt = adamw(model.parameters(), job.lr, device, betas=(0.9, 0.99))
    schedule = warmup_cosine(opt, job.steps, cfg.warmup)
    g = torch.Generator().manual_seed(job.seed)
    B = cfg.batch_size
    state = {"model": model, "opt": opt, "schedule": schedule, "data": g}
    if average is not None:
        state["ema"] = average
    t0 = time.time()
    loop = TrainLoop(
        path.replace(".safetensors", "_state"),
        cfg,
        job.steps,
        state,
        resume=flags.resume,
        save_every=flags.save_every,
        desc=f"{job.stage} training",
    )
    with loop:
        for step in loop:
            x0, prompts = data.clips(B, g)
            drop = torch.rand(B, generator=g) < cfg.cfg_dropout
            text = utils.stack_text(emb, ["" if d else p for p, d in zip(prompts, drop)], device)
            u = torch.sigmoid(torch.randn(B, 1, generator=g)) * 1000  # logit-normal, then shifted
            t = cv.shift_timesteps(u, cfg.shift).to(device)
            with utils.autocast(device, training=True):
                loss = job.loss(model, x0.to(device), t[:, 0], text, g)
            norm = optimizer_step(loss, opt, model.parameters(), cfg.grad_clip)
            schedule.step()
            if average is not None:
                average.update_parameters(model)
            if (step + 1) % flags.log_every == 0 or step + 1 == job.steps:
                log(job.stage, step + 1, job.steps, t0, loss=loss.item(), grad_norm=norm)
        if average is not None:
            model.load_state_dict(average.module.state_dict())
        # before the state goes
        save_model(path, model.eval(), text_encoder, stage=job.stage, steps=job.steps)
    print(f"wrote {path}")
    return model
