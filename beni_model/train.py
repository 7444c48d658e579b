"""The beni trainer, one process per device under torchrun:

    torchrun --nproc-per-node 2 -m beni_model.train --config train.json

FSDP2 shards every transformer block of the vision tower and the LLM as its own unit; the root unit holds the
rest (embeddings, the tied lm_head, the connector, norms), so tied weights always share a unit. bf16 compute
with fp32 master weights and reductions on GPU (NCCL), fp32 on CPU (gloo); a single GPU trains the plain
module under bf16 autocast, each block's inputs cast to bf16 as FSDP's policy casts them. Checkpoints (model,
optimizer, scheduler, data position, RNG) are written with torch.distributed.checkpoint into a temp folder that
rank 0 renames once every rank is done, and a new launch resumes from the newest one. Rank 0 logs to
metrics.jsonl, draws loss.png, optionally mirrors to wandb (offline unless WANDB_MODE says otherwise) and, when
started by Dagster Pipes, streams its logs and the final metadata back.
"""

import argparse
import sys
from pathlib import Path

from beni_model.training.config import TrainConfig
from beni_model.training.loop import train


def torchrun_command(config_path: str | Path, processes: int, nodes: int = 1, rendezvous: str = "", run_id: str = "beni") -> list[str]:
    """The command line that trains `config_path` with `processes` ranks on this machine: alone, or as one of `nodes`
    machines that meet at the c10d `rendezvous` endpoint (host:port) under `run_id`, each running this same command."""
    if nodes > 1 and not rendezvous:
        raise ValueError(f"Training on {nodes} nodes needs a rendezvous endpoint (host:port of one node) that every node can reach.")
    if nodes > 1:
        launch = [f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rendezvous}", f"--rdzv-id={run_id}"]
    else:
        launch = ["--standalone"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launch,
        f"--nproc-per-node={processes}",
        "-m",
        "beni_model.train",
        "--config",
        str(config_path),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a beni model on WebDataset shards (run under torchrun).")
    parser.add_argument("--config", required=True, help="JSON file with TrainConfig fields")
    config = TrainConfig.from_json(parser.parse_args().config)
    train(config)


if __name__ == "__main__":
    main()
