"""Distributed training, applied from outside the model (as torchtitan's parallelize.py does): the process group
torchrun asks for (RANK/WORLD_SIZE; without them, one plain process), FSDP2 sharding with activation checkpointing,
and the start that fits a node: only rank 0 builds the whole model, the others receive their shards."""
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import distribute_tensor

from nanovoco.model import VoCoLlama


def setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def barrier():
    if dist.is_initialized():
        dist.barrier()


def place(build, device, rank: int, world: int, *, freeze_vision: bool, activation_checkpointing: bool) -> VoCoLlama:
    """The model to train, on its device(s); build() makes the whole model (init.build_model: the checkpoint,
    the VoCo token, the compressor). One process: build(), then to the device. Under torchrun, a start that fits a
    node: only rank 0 calls build() and holds the whole model in host memory; every rank builds it on the meta device
    from rank 0's config, shards it (FSDP2), allocates its own shards only and receives their values from rank 0.
    Host memory per node: one whole model and the shards, not one whole model per process (docs/benchmarks.md)."""
    if world == 1:
        return shard(build(), device, world, activation_checkpointing)
    whole = build() if rank == 0 else None
    config = [whole.config if rank == 0 else None]
    dist.broadcast_object_list(config, src=0)  # a dataclass of numbers and strings, between our own processes
    with torch.device("meta"):
        vlm = VoCoLlama(config[0])
    vlm.vision.requires_grad_(not freeze_vision)
    vlm = shard(vlm, device, world, activation_checkpointing)
    vlm.to_empty(device=device)  # this rank's shards, uninitialised until filled below
    # One tensor at a time, so that a rank holds its shards and one whole tensor, never the whole model: rank 0
    # broadcasts it, every rank keeps its own slice, and rank 0 frees its whole copy as it goes.
    # (set_model_state_dict(..., broadcast_from_rank0=True) peaked at the whole model on every rank.)
    whole_state = whole.state_dict() if rank == 0 else None
    with torch.no_grad():
        for name, shard_of in vlm.state_dict().items():  # DTensors, sharded on dim 0 as fully_shard placed them
            full = whole_state.pop(name).to(device) if rank == 0 else torch.empty(
                shard_of.shape, dtype=shard_of.dtype, device=device)
            dist.broadcast(full, src=0)
            mine = distribute_tensor(full, shard_of.device_mesh, shard_of.placements, src_data_rank=None)
            shard_of.to_local().copy_(mine.to_local())
            if rank == 0:  # drop the whole model's reference too: the tensor is freed with `full`
                module, _, leaf = name.rpartition(".")
                delattr(whole.get_submodule(module), leaf)
            del full, mine
    return vlm


def shard(vlm: VoCoLlama, device, world: int, activation_checkpointing: bool) -> VoCoLlama:
    """Apply activation checkpointing and FSDP2 from outside the model, torchtitan-style: one FSDP unit per decoder
    block and one for the vision tower, then the root (embeddings, projector, norm, head). bf16 compute with fp32
    gradient reduction on CUDA; fp32 on the CPU. A model on the meta device stays there (place allocates it)."""
    from torch.distributed._composable import checkpoint as activation_checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if activation_checkpointing:
        for layer in vlm.llm.layers:
            activation_checkpoint(layer)  # recompute the block in backward; keeps the parameter names
    if world == 1:
        return vlm.to(device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    if not next(vlm.parameters()).is_meta:
        vlm.to(device)
    for layer in vlm.llm.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(vlm.vision, mp_policy=mp)
    fully_shard(vlm, mp_policy=mp)
    return vlm
