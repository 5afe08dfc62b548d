"""The main job (``examples/train.py``) under the deepspeed launcher, for the benchmarks that
compare its accuracy across settings: one run with a changed ds_config and extra arguments,
its result JSON back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main_job(config: dict[str, Any], name: str, seed: int, directory: Path, args: tuple[str, ...] = ()) -> dict:
    """``examples/train.py`` on 2 CPU ranks with ``config`` (a whole ds_config) and ``args``; its
    result JSON (held-out top-1, the ``history`` of evaluations, ...). Raises with the output on failure."""
    config_path, result_path = directory / f"{name}.json", directory / f"{name}_result.json"
    config_path.write_text(json.dumps(config))
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "examples" / "train.py"), "--deepspeed_config", str(config_path), "--seed", str(seed),
               "--result-json", str(result_path), *args]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"main job {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(result_path.read_text())
