"""A tiny trained run (teacher, ODE pairs, ODE student, DMD student) that the script tests share."""

import shutil

import pytest

import train_dmd


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
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
    return out


@pytest.fixture
def fresh_run(run_dir, tmp_path):
    """A private copy of run_dir's teacher and ODE pairs (and ODE student), for tests that write."""
    for name in ["teacher.safetensors", "ode.safetensors"]:
        shutil.copy(run_dir / name, tmp_path / name)
    shutil.copytree(run_dir / "ode_pairs", tmp_path / "ode_pairs")
    return tmp_path
