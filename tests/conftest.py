"""What several test files share: a tiny trained toy run (teacher, ODE pairs, ODE student, DMD
student), and a tiny random Wan2.1 directory in the diffusers layout with a run on it."""

import contextlib
import io
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import train_dmd


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """The run, its scorecard on: what it printed is in stdout.txt."""
    out = tmp_path_factory.mktemp("run")
    printed = io.StringIO()
    with contextlib.ExitStack() as shown, contextlib.redirect_stdout(printed):
        shown.callback(lambda: print(printed.getvalue()))  # (what pytest shows if it fails)
        train_dmd.main(
            [
                "--tiny",
                "--run-dir",
                str(out),
                "--steps",
                "3",
                "--ode-steps",
                "2",
                "--teacher-steps",
                "3",
                "--pairs",
                "3",
                "--batch-size",
                "2",
                "--sample-every",
                "2",
                "--device",
                "cpu",
                "--set",
                "warmup=1",
            ]
        )  # --set reaches every stage
    (out / "stdout.txt").write_text(printed.getvalue())
    return out


@pytest.fixture
def fresh_run(run_dir, tmp_path):
    """A private copy of run_dir's teacher and ODE pairs (and ODE student), for tests that write."""
    for name in ["teacher.safetensors", "ode.safetensors"]:
        shutil.copy(run_dir / name, tmp_path / name)
    shutil.copytree(run_dir / "ode_pairs", tmp_path / "ode_pairs")
    return tmp_path


TINY_DIT = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=32,
    ffn_dim=40,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)


def randomize(model, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="session")
def wan_dir(tmp_path_factory):
    """A tiny random Wan2.1-T2V-Diffusers directory:
    sharded transformer/, text_encoder/, tokenizer/, vae/."""
    diffusers = pytest.importorskip("diffusers")
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("Wan2.1-T2V-tiny-Diffusers")
    torch.manual_seed(0)
    dit = randomize(diffusers.WanTransformer3DModel(**TINY_DIT))
    dit.save_config(root / "transformer")
    state, files = dit.state_dict(), {}  # three shards + an index, as the real release ships them
    for i, key in enumerate(sorted(state)):
        files.setdefault(f"diffusion_pytorch_model-0000{i % 3 + 1}-of-00003.safetensors", {})[
            key
        ] = state[key].contiguous()
    for name, part in files.items():
        save_file(part, str(root / "transformer" / name))
    (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps(
            {"metadata": {}, "weight_map": {k: name for name, part in files.items() for k in part}}
        )
    )
    te = randomize(
        UMT5EncoderModel(
            UMT5Config(
                vocab_size=384,
                d_model=16,
                d_kv=8,
                d_ff=32,
                num_layers=2,
                num_heads=2,
                relative_attention_num_buckets=8,
            )
        ),
        1,
        0.3,
    )
    te.save_pretrained(root / "text_encoder")
    ByT5Tokenizer().save_pretrained(root / "tokenizer")
    vae = diffusers.AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.5, 2.0, 1.0],
    )
    randomize(vae, 2, 0.05).save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="session")
def wan_run(wan_dir, tmp_path_factory):
    """train_ode.py (teacher = the Wan directory itself) and train_dmd.py on the tiny Wan
    directory, with small frame sizes set by --set.
    -> (the flags every script gets, the run directory)."""
    import train_dmd
    import train_ode

    tmp = tmp_path_factory.mktemp("wan_run")
    (tmp / "prompts.txt").write_text("a cat walking\na dog running\n\n")
    common = [
        "--config",
        "wan2.1-t2v-1.3b",
        "--model-dir",
        str(wan_dir),
        "--run-dir",
        str(tmp / "run"),
        "--device",
        "cpu",
        "--set",
        "height=4",
        "--set",
        "width=6",
        "--set",
        "num_frames=6",
        "--set",
        "text_len=12",
        "--set",
        "teacher_steps=6",
        "--set",
        "student_step_indices=0,3,5",
    ]
    train_ode.main(common + ["--prompts", str(tmp / "prompts.txt"), "--pairs", "2", "--steps", "2"])
    train_dmd.main(common + ["--steps", "3"])
    return common, tmp / "run"
