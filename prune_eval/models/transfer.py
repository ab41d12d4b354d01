"""Moving a loaded checkpoint's weights onto the GPU, staged through pinned buffers.

`from_pretrained` without a device map leaves an unquantized model's weights in the checkpoint's
memory map: pageable host memory. `model.to("cuda")` copies pageable memory, which the CUDA driver
stages through its own pinned buffers one copy at a time: LLaVA-1.5-7B's 13.2 GiB (fp16) took
1.60-2.32 s on an H200 (6.1-8.8 GB/s), and the same copies issued from 4-32 threads took longer.
`move_to_device` stages them itself: a few threads each copy chunks into two pinned buffers of
their own, in turn, and send each chunk with an asynchronous copy on their own CUDA stream, so the
host-side copies of one thread overlap the transfers of the others: 0.38-0.62 s (22.6-37 GB/s) for
the same weights, every byte equal to `model.to`'s (benchmarks/weight_transfer.py; BENCHMARKS.md,
"Moving the weights to the GPU", which also lists the thread counts and chunk sizes tried).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

COPY_THREADS = 4  # 4 x 32 MiB: the fastest of the six settings tried (BENCHMARKS.md)
CHUNK_BYTES = 32 << 20

Chunk = tuple[torch.Tensor, torch.Tensor, int, int]  # (source bytes, target bytes, offset, length)


def move_to_device(model: torch.nn.Module, device: torch.device, *, threads: int = COPY_THREADS, chunk_bytes: int = CHUNK_BYTES) -> torch.nn.Module:
    """`model.to(device)` for parameters and buffers (dtypes and shared tensors kept; a
    non-contiguous tensor arrives contiguous), with the copies staged as above on CUDA and copied
    chunk by chunk elsewhere. Returns the model, moved in place like `.to`. Raises what allocating
    the targets raises (torch.OutOfMemoryError when the GPU is too small); the model is unchanged
    then, and when a copy fails."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # tensors report cuda:N
    tensors = list({id(t): t for t in itertools.chain(model.parameters(), model.buffers()) if t.device != device}.values())
    if not tensors:
        return model
    targets = {id(t): torch.empty_like(t, device=device, memory_format=torch.contiguous_format) for t in tensors}
    copy_chunks(list(chunks([(t.detach(), targets[id(t)]) for t in tensors], chunk_bytes)), device, threads=threads, chunk_bytes=chunk_bytes)
    return swap_tensors(model, targets)


def swap_tensors(model: torch.nn.Module, targets: dict[int, torch.Tensor]) -> torch.nn.Module:
    """Every parameter and buffer `t` of the model replaced by `targets[id(t)]` (kept where absent),
    through Module._apply as `.to` does: a parameter keeps its Parameter object where the tensor
    types allow (`param.data = target`), so tensors shared between modules stay shared."""
    return model._apply(lambda t: targets.get(id(t), t))


def chunks(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], chunk_bytes: int) -> Iterator[Chunk]:
    """Each (source, target) pair's bytes in pieces of at most `chunk_bytes`, largest tensors first.
    Sources are made contiguous (a no-op for memory-mapped weights); targets must be contiguous."""
    for source, target in sorted(pairs, key=lambda pair: -pair[0].numel() * pair[0].element_size()):
        source_bytes = source.contiguous().reshape(-1).view(torch.uint8)
        target_bytes = target.reshape(-1).view(torch.uint8)
        for offset in range(0, source_bytes.numel(), chunk_bytes):
            yield source_bytes, target_bytes, offset, min(chunk_bytes, source_bytes.numel() - offset)


def copy_chunks(work: Sequence[Chunk], device: torch.device, *, threads: int, chunk_bytes: int) -> None:
    """Copy every chunk, `threads` threads taking the next one as they go. On CUDA each thread has
    two pinned buffers and a stream that first waits for the caller's stream (where the targets were
    allocated); it waits for a buffer's last transfer before refilling it, and for all of its
    transfers before it returns, also when a copy fails. Elsewhere (the CPU tests of the chunking)
    the chunks are copied directly. Returns when every copy has finished; raises the first error of
    any thread (the others stop taking chunks)."""
    if not work:
        return
    pending = iter(work)
    lock = threading.Lock()
    failed = threading.Event()
    caller_stream = torch.cuda.current_stream(device) if device.type == "cuda" else None  # per thread: read it here

    def next_chunk() -> Chunk | None:
        with lock:
            return None if failed.is_set() else next(pending, None)

    def copy_directly() -> None:
        while (chunk := next_chunk()) is not None:
            source, target, offset, length = chunk
            target[offset : offset + length].copy_(source[offset : offset + length])

    def copy_staged() -> None:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(caller_stream)
        try:
            buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            sent: list[torch.cuda.Event | None] = [None, None]
            turn = 0
            while (chunk := next_chunk()) is not None:
                source, target, offset, length = chunk
                if sent[turn] is not None:
                    sent[turn].synchronize()  # the buffer's previous chunk has reached the GPU
                buffers[turn][:length].copy_(source[offset : offset + length])
                with torch.cuda.stream(stream):
                    target[offset : offset + length].copy_(buffers[turn][:length], non_blocking=True)
                    sent[turn] = torch.cuda.Event()
                    sent[turn].record(stream)
                turn ^= 1
        finally:
            stream.synchronize()  # nothing in flight once this thread is done, whatever happened

    def run() -> None:
        try:
            (copy_staged if caller_stream is not None else copy_directly)()
        except BaseException:
            failed.set()
            raise

    n = max(1, min(threads, len(work)))
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="prune-eval-weights") as pool:
        for future in [pool.submit(run) for _ in range(n)]:
            future.result()
