"""Processes, devices and parallelism: torchrun set-up, FSDP2 over the transformer blocks, compile, CUDA graphs and
the one-GPU bf16 casts."""

import os
import socket

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from beni_model.training.config import TrainConfig
from beni_model.training.model import beni_of


def setup_distributed(config: TrainConfig) -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # a plain `python -m beni_model.train`: one process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, world_size, device


def reporting_rank(rank: int, device: torch.device) -> int:
    """The rank that reports metrics: the lowest one started through Dagster Pipes, else 0. On several hosts the c10d
    rendezvous numbers the nodes by address, so the node Dagster launched need not hold rank 0; the others' agents,
    started by hand, have no Pipes context."""
    none = 1 << 30
    mine = torch.tensor([rank if os.environ.get("DAGSTER_PIPES_CONTEXT") else none], device=device)
    dist.all_reduce(mine, op=dist.ReduceOp.MIN)
    lowest = int(mine.item())
    return lowest if lowest < none else 0


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers of the vision encoder and the LLM: members of a ModuleList whose class the part
    itself names as unsplittable."""
    beni = beni_of(model)
    blocks = []
    for part in (beni.vision_tower.encoder, beni.language_model):
        names = set(getattr(part, "_no_split_modules", None) or [])
        for module in part.modules():
            if isinstance(module, nn.ModuleList):
                blocks += [child for child in module if type(child).__name__ in names]
    return blocks


def shard(model: nn.Module, device: torch.device, world_size: int, compile: bool = False, cuda_graphs: bool = False) -> nn.Module:
    """FSDP2 over the ranks: each transformer block its own unit, the rest (embeddings, tied lm_head,
    connector) the root unit. One process skips FSDP: there is nothing to shard, and its per-block casts and
    copies cost a third of the step on one GPU; the fp32 module then runs under bf16 autocast (train_step), each
    block's floating inputs cast to bf16 as FSDP's policy casts them (`bf16_inputs`).
    `cuda_graphs` makes each compiled block a CUDA graph: the compiled step is bound by the host's kernel launches
    (bench/BENCHMARKS.md), and a graph replays a block's kernels in one launch. It needs one process (FSDP's
    collectives run between the blocks) and costs a capture per new batch shape."""
    if cuda_graphs and world_size > 1:
        raise ValueError(f"cuda_graphs needs one process; this run has {world_size}: leave cuda_graphs off under FSDP.")
    model.to(device)
    blocks = transformer_blocks(model)
    if under_autocast(device, world_size):
        for block in blocks:
            block.register_forward_pre_hook(bf16_inputs, with_kwargs=True)
    if compile:
        for block in blocks:
            block.compile(mode="reduce-overhead" if cuda_graphs else None)
        beni_of(model).vision_tower.compile_stem()
    for extension in beni_of(model).extensions.values():
        extension.to_device(device, compile)
    if world_size == 1:
        return model
    mesh = init_device_mesh(device.type, (world_size,))
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def under_autocast(device: torch.device, world_size: int) -> bool:
    """Whether the step runs the fp32 module under bf16 autocast, its blocks fed bf16 (`bf16_inputs`): on one GPU.
    FSDP casts for itself on several, and the CPU trains in fp32."""
    return device.type == "cuda" and world_size == 1


def bf16_inputs(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block's floating-point inputs in bf16. Autocast casts only a matmul's inputs, so without this the residual
    stream between the blocks (and the rotary tables) would stay fp32 and double the traffic of every norm, add and
    activation: 5.7% of the small config's GPU time per step on an H200 (bench/BENCHMARKS.md)."""

    def cast(x):
        return x.to(torch.bfloat16) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return tuple(map(cast, args)), {k: cast(v) for k, v in kwargs.items()}
