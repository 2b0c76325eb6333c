"""The README's sampling section, run as typed: every line of its command block, verbatim, in a
temporary directory that holds what the README's set-up leaves (the scripts, weights/, and a
student at runs/tiny/dmd.safetensors: here the tests' tiny one), each line after those above it."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def section_commands(heading: str) -> list[str]:
    """The lines of the first bash block under a README heading, as typed."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(heading) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_sampling_section_runs_as_typed(run_dir, tmp_path):
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name == "weights":
            os.symlink(ROOT / name, tmp_path / name)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    shutil.copy(run_dir / "dmd.safetensors", tmp_path / "runs" / "tiny" / "dmd.safetensors")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    commands = section_commands("## Sampling and the applications")
    assert len(commands) >= 5 and all(c.startswith("python sample.py --tiny") for c in commands)
    out = tmp_path / "runs" / "tiny"
    made = []  # each line's frames (the lines after the first write samples_dmd.*)
    for command in commands:
        done = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        assert "time to first chunk" in done.stdout, command
        newest = max(out.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns)
        made.append(np.load(newest)["frames"])
        assert newest.with_suffix(".gif").exists() and newest.with_suffix(".mp4").exists()
    clip, i2v, v2v, switched, long = made
    assert clip.shape == v2v.shape == switched.shape == (1, 12, 16, 16, 3)
    assert (out / "clip.npz").exists()  # the first line's clip, the next two lines' input
    assert i2v.shape == (1, 15, 16, 16, 3)  # the given chunk (the clip's frame 0, still) + 12
    assert (i2v[0, :3] == clip[0, :1]).all()
    assert long.shape == (1, 120, 16, 16, 3)
