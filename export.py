"""Hand a Wan student to the tools Wan users run: a diffusers transformer directory and a LoRA.

  python export.py --config wan2.1-t2v-1.3b --model-dir $W --run-dir runs/wan --lora-rank 64

writes into --out (default <run>/export):
  transformer/                  the student as a diffusers WanTransformer3DModel directory
                                (config.json + safetensors, diffusers' names):
                                WanTransformer3DModel.from_pretrained loads it;
  causvid_lora_rank<r>.safetensors  the student's difference from its teacher (--model-dir) as a
                                LoRA: per linear layer the rank-r SVD of (student - teacher) as
                                lora_down x lora_up, the bias differences as diff_b, under Wan's own
                                names with the prefix "diffusion_model." -- the format ComfyUI reads
                                and diffusers' Wan LoRA loader converts. Norms, adaLN modulation
                                tables and the patch embedding have no LoRA; their relative
                                difference is printed (and so is the error the rank leaves).
In diffusers the student runs as a bidirectional few-step model, without the KV cache (the way the
community CausVid LoRA is used): docs/wan.md has the loading code and the sampling settings.
"""

import argparse
import collections
import os

import torch
import torch.nn as nn

import causvid as cv
import utils
import wan


def parse_args(argv=None):
    p = utils.add_common_args(
        argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    )
    p.add_argument("--ckpt", help="the student checkpoint (default: <run>/dmd.safetensors)")
    p.add_argument("--out", help="the export directory (default: <run>/export)")
    p.add_argument(
        "--lora-rank", type=int, default=64, help="the LoRA's rank; 0: no LoRA (default: 64)"
    )
    return p.parse_args(argv)


def lora(student: nn.Module, teacher: nn.Module, rank: int) -> tuple[dict, dict, dict]:
    """(student - teacher) of every linear layer as a rank-`rank` product up @ down (the SVD's
    best), bias differences whole. -> (the LoRA under Wan's names, relative error the rank leaves
    per layer type, relative difference per parameter type that no LoRA carries)."""
    out = {}
    err = collections.defaultdict(lambda: [0.0, 0.0])
    left = collections.defaultdict(lambda: [0.0, 0.0])
    linear = {name for name, m in student.named_modules() if isinstance(m, nn.Linear)}
    theirs = dict(teacher.named_parameters())
    for name, w in student.named_parameters():
        module, _, kind = name.rpartition(".")
        delta, base = (w - theirs[name]).detach().double(), theirs[name].detach().double()
        # blocks.3.ffn.0.weight -> blocks.ffn.weight
        group = ".".join(p for p in name.split(".") if not p.isdigit())
        if module not in linear:
            left[group][0] += delta.square().sum().item()
            left[group][1] += base.square().sum().item()
        elif kind == "bias":
            out[f"diffusion_model.{module}.diff_b"] = delta.float()
        else:
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            # (zero columns pad a smaller layer to `rank`: one rank, one LoRA scale)
            r = min(rank, len(S))
            up = torch.cat([U[:, :r] * S[:r], delta.new_zeros(delta.shape[0], rank - r)], 1)
            down = torch.cat([Vh[:r], delta.new_zeros(rank - r, delta.shape[1])])
            out[f"diffusion_model.{module}.lora_up.weight"] = up.float().contiguous()
            out[f"diffusion_model.{module}.lora_down.weight"] = down.float().contiguous()
            err[group][0] += (delta - up @ down).square().sum().item()
            err[group][1] += delta.square().sum().item()

    def ratio(d):
        return {k: (a / b) ** 0.5 if b else 0.0 for k, (a, b) in d.items()}

    return out, ratio(err), ratio(left)


def main(argv=None):
    from safetensors.torch import save_file

    args = parse_args(argv)
    cfg, device, run = utils.resolve(args)
    path = args.ckpt or os.path.join(run, "dmd.safetensors")
    student = utils.load_model(path, device=device)
    if student.cfg.name == "tiny" or student.cfg.text_encoder == "tiny":
        raise cv.CausVidError(
            f"{path!r} is a toy-world checkpoint; export is for Wan students "
            "(--config wan2.1-t2v-1.3b)"
        )
    if args.lora_rank < 0:
        raise cv.CausVidError(
            f"--lora-rank {args.lora_rank} must be >= 0 (0: the transformer directory only)"
        )
    if args.lora_rank and not args.model_dir:
        raise cv.CausVidError(
            "the LoRA is the student's difference from its teacher: pass --model-dir (the Wan "
            "directory it was distilled from), or --lora-rank 0 for the transformer alone"
        )
    out = utils.writable_dir(args.out or os.path.join(run, "export"), "--out")
    wan.save_diffusers(student, os.path.join(out, "transformer"))
    print(f"wrote {os.path.join(out, 'transformer')} (diffusers WanTransformer3DModel)")
    if not args.lora_rank:
        return
    teacher = wan.load_wan(args.model_dir, student.cfg).to(device)
    if any(a.shape != b.shape for a, b in zip(student.parameters(), teacher.parameters())):
        raise cv.CausVidError(
            f"{path!r} does not have the shapes of the Wan model in {args.model_dir!r}: "
            "not its teacher"
        )
    with torch.no_grad():
        state, err, left = lora(student, teacher, args.lora_rank)
    name = os.path.join(out, f"causvid_lora_rank{args.lora_rank}.safetensors")
    save_file(
        {k: v.cpu() for k, v in state.items()},
        name,
        metadata={"format": "pt", "rank": str(args.lora_rank)},
    )
    print(
        f"wrote {name}: relative error ||(S - T) - LoRA|| / ||S - T|| per layer type "
        f"at rank {args.lora_rank}:"
    )
    for k, v in sorted(err.items()):
        print(f"  {k:40s} {v:.2e}")
    print(
        "not in the LoRA (no LoRA form; diffusers and ComfyUI keep the teacher's): "
        "||S - T|| / ||T||:"
    )
    for k, v in sorted(left.items()):
        print(f"  {k:40s} {v:.2e}")


if __name__ == "__main__":
    utils.run_cli(main)
