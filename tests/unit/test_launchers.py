"""scripts/run_cpt.sh and scripts/run_sft.sh against stub ``deepspeed``, ``torchrun`` and ``nvidia-smi`` that record
what they get: the GPUs of CUDA_VISIBLE_DEVICES, several nodes, launcher options before the script, DS_CONFIG=none.

The stubs stand in for programs that need GPUs and other hosts; the command line they receive is what the real
launcher would parse (DeepSpeed's runner drops CUDA_VISIBLE_DEVICES unless it gets --include, and refuses
--num_gpus together with --include).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STUB = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as fh:
    fh.write(json.dumps({"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                         "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
"""
NVIDIA_SMI = """#!/usr/bin/env bash
for i in $(seq 0 $((${STUB_GPUS:-0} - 1))); do echo "GPU $i: NVIDIA H200 (UUID: GPU-$i)"; done
"""


@pytest.fixture()
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("deepspeed", STUB), ("torchrun", STUB), ("nvidia-smi", NVIDIA_SMI)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def launch(stubs: Path, stage: str, env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run scripts/run_STAGE.sh with the stubs first on PATH; return the process and what the launcher got."""
    log = stubs.parent / "launch.jsonl"
    log.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in (
        "CUDA_VISIBLE_DEVICES", "NUM_GPUS", "HOSTFILE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "PORT",
        "LAUNCHER_ARGS", "DS_CONFIG", "CONFIG", "MODEL", "DATA", "OUT")}
    full = {**base, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log),
            "CONFIG": f"{stage}/configs/smollm2_quick.yaml", **env}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / f"run_{stage}.sh"), *args], env=full, capture_output=True,
                          text=True, timeout=60)
    got = json.loads(log.read_text().splitlines()[0]) if log.exists() else None
    return proc, got


@pytest.mark.parametrize("stage", ["cpt", "sft"])
def test_every_gpu_nvidia_smi_lists_without_cuda_visible_devices(stubs, stage):
    proc, got = launch(stubs, stage, {"STUB_GPUS": "4"})
    assert proc.returncode == 0, proc.stderr
    port = "29500" if stage == "cpt" else "29501"
    assert got["prog"] == "deepspeed"
    assert got["argv"] == ["--num_gpus", "4", "--master_port", port, f"{stage}/train.py", "--config",
                           f"{stage}/configs/smollm2_quick.yaml", "--deepspeed", "ds_configs/zero3.json"]
    assert proc.stdout.startswith(f"running: deepspeed --num_gpus 4 --master_port {port} {stage}/train.py")


def test_cuda_visible_devices_becomes_include(stubs):
    proc, got = launch(stubs, "sft", {"STUB_GPUS": "8", "CUDA_VISIBLE_DEVICES": "2,3"}, "--max_steps", "10")
    assert proc.returncode == 0, proc.stderr
    # DeepSpeed refuses --num_gpus with --include, and without --include re-numbers all 8 GPUs of the node.
    assert got["argv"][:4] == ["--include", "localhost:2,3", "--master_port", "29501"]
    assert "--num_gpus" not in got["argv"] and got["argv"][-2:] == ["--max_steps", "10"]
    proc, got = launch(stubs, "sft", {"STUB_GPUS": "8", "CUDA_VISIBLE_DEVICES": "5,6,7", "NUM_GPUS": "2"})
    assert got["argv"][:2] == ["--include", "localhost:5,6"]


@pytest.mark.parametrize("env, message", [
    ({"CUDA_VISIBLE_DEVICES": "0,1", "NUM_GPUS": "4"}, "NUM_GPUS=4 but CUDA_VISIBLE_DEVICES=0,1 holds 2 GPU(s)"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-8f2c"}, "the launchers need GPU indices (e.g. 0,1), not UUIDs"),
    ({"NUM_GPUS": "0"}, "NUM_GPUS=0 must be a whole number >= 1"),
    ({"HOSTFILE": "no-such-hostfile"}, "HOSTFILE=no-such-hostfile does not exist"),
    ({"DS_CONFIG": "none", "NNODES": "2", "MASTER_ADDR": "node1"}, "torchrun runs once per node; set NODE_RANK"),
    ({"DS_CONFIG": "ds_configs/zero9.json"}, "DS_CONFIG=ds_configs/zero9.json does not exist"),
])
def test_contradicting_settings_are_refused_before_launching(stubs, env, message):
    proc, got = launch(stubs, "cpt", {"STUB_GPUS": "8", **env})
    assert proc.returncode == 2 and got is None
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr


def test_two_nodes_from_a_hostfile_with_launcher_options_before_the_script(stubs, tmp_path):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("# two nodes of 8 GPUs\nnode-a slots=8\nnode-b slots=8\n\n")
    proc, got = launch(stubs, "sft", {"HOSTFILE": str(hostfile), "NUM_GPUS": "8",
                                      "LAUNCHER_ARGS": "--launcher pdsh --ssh_port 2222"}, "--max_steps", "3")
    assert proc.returncode == 0, proc.stderr
    script = got["argv"].index("sft/train.py")
    assert got["argv"][:script] == ["--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "8", "--master_addr",
                                    "node-a", "--master_port", "29501", "--launcher", "pdsh", "--ssh_port", "2222"]
    assert got["argv"][script:] == ["sft/train.py", "--config", "sft/configs/smollm2_quick.yaml", "--deepspeed",
                                    "ds_configs/zero3.json", "--max_steps", "3"]
    proc, got = launch(stubs, "sft", {"HOSTFILE": str(hostfile), "NNODES": "1", "MASTER_ADDR": "10.0.0.9",
                                      "PORT": "30000"})
    # Without NUM_GPUS the hostfile's slots decide (no --num_gpus from a launching node that may have no GPU).
    assert got["argv"][:7] == ["--hostfile", str(hostfile), "--num_nodes", "1", "--master_addr", "10.0.0.9",
                               "--master_port"] and got["argv"][7] == "30000"


def test_ds_config_none_runs_torchrun_without_deepspeed(stubs):
    proc, got = launch(stubs, "cpt", {"STUB_GPUS": "4", "CUDA_VISIBLE_DEVICES": "1,3", "DS_CONFIG": "none",
                                      "MODEL": "m", "OUT": "runs/x"})
    assert proc.returncode == 0, proc.stderr
    assert got["prog"] == "torchrun" and got["CUDA_VISIBLE_DEVICES"] == "1,3"  # torchrun keeps the variable
    assert got["argv"] == ["--nproc_per_node", "2", "--master_port", "29500", "cpt/train.py", "--config",
                           "cpt/configs/smollm2_quick.yaml", "--deepspeed", "none", "--model_name_or_path", "m",
                           "--output_dir", "runs/x"]
    proc, got = launch(stubs, "cpt", {"DS_CONFIG": "none", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node-a",
                                      "NUM_GPUS": "8"})
    assert got["argv"][:10] == ["--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1", "--master_addr", "node-a",
                                "--master_port", "29500"]


def test_deepspeed_none_turns_off_a_configs_deepspeed(tmp_path):
    from tsarank.training.arguments import TsarankTrainingArguments

    for value in ("none", "None", ""):
        assert TsarankTrainingArguments(output_dir=str(tmp_path), deepspeed=value, report_to="none").deepspeed is None
