"""Per-rank parameter, gradient and optimizer-state memory under DDP and FSDP2 (CPU, gloo).

    python benchmarks/fsdp_memory.py [--processes 2] [--layers 8] [--hidden 512]

Builds a Llama of ``--layers`` × ``--hidden`` (the embedded task's tokenizer) on each of
``--processes`` processes, wraps it in DDP or shards it with lit-p3o's FSDP2 helper
(:func:`lit_p3o.models.shard_model`, the one every stage's ``configure_model`` uses), runs one
forward/backward and one AdamW step, and counts the bytes of the tensors each rank holds:
its parameters (FSDP2: the local shards), gradients and AdamW state. These are exact tensor
sizes, not process RSS, so the figures do not depend on machine load. Sharded state should be
about 1/processes of DDP's per rank.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh

    from lit_p3o.models import ModelSpec, build_causal_lm, load_tokenizer, shard_model

    spec = ModelSpec(
        architecture={
            "model_type": "llama",
            "hidden_size": args.hidden,
            "intermediate_size": 4 * args.hidden,
            "num_hidden_layers": args.layers,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "max_position_embeddings": 128,
        },
        tokenizer="embedded:reviews",
    )
    tokenizer = load_tokenizer(spec)
    for mode in ("ddp", "fsdp2"):
        torch.manual_seed(0)
        model = build_causal_lm(spec, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            shard_model(model, init_device_mesh("cpu", (world,)))
            wrapped = model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(3, len(tokenizer), (2, 32))
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        params = local_bytes(model.parameters())
        grads = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
        state = local_bytes(
            v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
        )
        results.append((mode, rank, n_params, params, grads, state))
        del wrapped, model, optimizer
        dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().list()
    mp.spawn(worker, args=(args.processes, port, args, results), nprocs=args.processes, join=True)
    mib = 2**20
    rows = sorted(results)
    print(
        f"Llama {args.layers} layers x {args.hidden}, {rows[0][2] / 1e6:.1f}M parameters, float32, "
        f"{args.processes} CPU processes (gloo)"
    )
    print("| strategy | rank | parameters (MiB) | gradients (MiB) | AdamW state (MiB) | total (MiB) |")
    print("|---|---|---|---|---|---|")
    for mode, rank, _, params, grads, state in rows:
        print(
            f"| {mode} | {rank} | {params / mib:.1f} | {grads / mib:.1f} | {state / mib:.1f} | "
            f"{(params + grads + state) / mib:.1f} |"
        )
    total = {m: sum(p + g + s for mm, _, _, p, g, s in rows if mm == m) / args.processes for m in ("ddp", "fsdp2")}
    print(f"FSDP2 / DDP per rank: {total['fsdp2'] / total['ddp']:.3f} (1/{args.processes} = {1 / args.processes:.3f})")


if __name__ == "__main__":
    main()
