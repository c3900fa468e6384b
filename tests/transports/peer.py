"""The source side of the contract tests: a separate process (spawned, as workers are) that owns
a transport and answers commands over a multiprocessing pipe. Replies are ("ok", value) or
("err", repr)."""
from __future__ import annotations

import os
import time
import traceback


def engine_model() -> str:
    """The real SmolLM2 where it is fetched (here, CI); its random-weight twin of the same shape
    where it cannot be (the GPU host has no network). Both sides of a test load the same one."""
    from lmdisagg.models import resolve_model
    real = resolve_model("smollm2-135m", fetch=False).path
    return "smollm2-135m" if (real / "model.safetensors").is_file() else "smollm2-135m-dummy"


def fill(flat, seed: int) -> None:
    """Distinct, seed-dependent bytes at every position (fast enough for GiB-sized buffers)."""
    import torch
    n = flat.numel() // 8
    words = torch.arange(n, dtype=torch.int64).mul_(2 * seed + 1).add_(seed * 0x9E3779B97F4A7C15 % (1 << 62))
    flat[:n * 8].copy_(words.view(torch.uint8).to(flat.device))


def digests(flat, block_ids, block_nbytes) -> list[int]:
    from lmdisagg.transports._blocks import block_checksums
    return list(block_checksums(flat, block_ids, block_nbytes))


def main(conn, name: str, options: dict, device: str) -> None:
    import torch
    from lmdisagg.transports import create_transport
    from tests.transports import leaks
    # one-time global state (library threads, torch's thread pool) is not a leak
    create_transport(name, **options).close()
    fill(torch.empty(1 << 20, dtype=torch.uint8, device=device), 0)
    if torch.device(device).type == "cuda":  # torch keeps one CUDA IPC ref-counter file per process
        torch.empty(1, device=device).untyped_storage()._share_cuda_()
    before = leaks.snapshot()
    tx = create_transport(name, **options)
    bufs, engine, pinned, pulls = {}, None, [], []
    while True:
        op, *args = conn.recv()
        try:
            if op == "raw":  # a buffer of nbytes, in blocks of block_nbytes, from the transport's allocator
                nbytes, seed = args
                t = tx.allocate((nbytes,), torch.uint8, device)
                fill(t, seed)
                buf = tx.register(t)
                bufs[buf.desc.buffer_id] = buf
                out = buf.desc.buffer_id
            elif op == "plain":  # as "raw", in ordinary memory rather than the transport's allocator
                nbytes, seed = args
                t = torch.empty(nbytes, dtype=torch.uint8, device=device)
                fill(t, seed)
                buf = tx.register(t)
                bufs[buf.desc.buffer_id] = buf
                out = buf.desc.buffer_id
            elif op == "bufdesc":  # a registered buffer's descriptor (it names this peer)
                bid, = args
                out = bufs[bid].desc
            elif op == "describe":
                bid, block_ids, block_nbytes, checksum = args
                buf = bufs[bid]
                out = (tx.describe(buf, block_ids, block_nbytes, checksum=checksum),
                       digests(buf.flat, block_ids, block_nbytes))
            elif op == "corrupt":  # flip one byte of what the medium serves
                bid, offset = args
                mirror = bufs[bid].state.get("mirror")  # shm staging serves a host copy
                flat = tx._owned[mirror].flat if mirror else bufs[bid].flat
                view = flat[offset:offset + 1]
                view.copy_(view ^ torch.ones_like(view))
                out = None
            elif op == "engine":  # prefill a prompt; its chunks stay pinned for the puller
                prompt, chunk_tokens = args
                from lmdisagg.engine import Engine, SamplingParams
                engine = Engine(model=engine_model(), device=device, chunk_tokens=chunk_tokens,
                                num_blocks=64, max_model_len=512, kv_allocator=tx.allocate)
                first = engine.generate(prompt, SamplingParams(max_tokens=1))[0].token_ids
                keys = engine.chunk_keys(prompt)
                pinned = engine.pin_chunks(keys)
                buf = tx.register(engine.kv_buffer)
                bufs[buf.desc.buffer_id] = buf
                nb = engine.layout.chunk_nbytes
                out = (keys, tx.describe(buf, pinned, nb), digests(buf.flat, pinned, nb), first)
            elif op == "pull":  # as a destination: pull into a fresh buffer, reply once bytes move
                desc, = args
                dst = tx.register(tx.allocate((desc.nbytes,), torch.uint8, device))
                bufs[dst.desc.buffer_id] = dst
                x = tx.pull(desc, dst, list(range(len(desc.block_ids))))
                pulls.append(x)
                deadline = time.monotonic() + 60
                while not (x.poll().terminal or x.bytes_done) and time.monotonic() < deadline:
                    time.sleep(0.0005)
                out = x.state.value
            elif op == "pulls":  # as a destination: pull each descriptor into a fresh buffer, all at
                descs, = args    # once; the block digests of each, once every pull is DONE
                xs = []
                for desc in descs:
                    dst = tx.register(tx.allocate((desc.nbytes,), torch.uint8, device))
                    bufs[dst.desc.buffer_id] = dst
                    xs.append((tx.pull(desc, dst, list(range(len(desc.block_ids)))), dst, desc))
                for x, *_ in xs:
                    x.wait(60)
                out = [digests(dst.flat, range(len(d.block_ids)), d.block_nbytes) for _, dst, d in xs]
            elif op == "push":  # push blocks of a buffer into a destination's expectation
                bid, ticket, block_ids, wait = args
                x = tx.push(ticket, bufs[bid], block_ids)
                pulls.append(x)
                if wait:
                    x.wait(60)
                out = x.state.value
            elif op == "push_state":  # the state of the last push, once terminal (or after `timeout`)
                timeout, = args
                x = pulls[-1]
                deadline = time.monotonic() + timeout
                while not x.poll().terminal and time.monotonic() < deadline:
                    time.sleep(0.001)
                out = (x.state.value, repr(x.error))
            elif op == "abort_last":
                pulls[-1].abort()
                out = (pulls[-1].state.value, repr(pulls[-1].error))
            elif op == "expect":  # as a destination: expect blocks from a source into a fresh buffer
                source, nblocks, block_nbytes, *checksum = args
                dst = tx.register(tx.allocate((nblocks * block_nbytes,), torch.uint8, device))
                bufs[dst.desc.buffer_id] = dst
                x = tx.expect(source, dst, list(range(nblocks)), block_nbytes, checksum=bool(checksum and checksum[0]))
                pulls.append(x)
                out = x.ticket.pack()
            elif op == "drop":  # deregister a buffer and let go of it
                bid, = args
                tx.deregister(bufs.pop(bid))
                t = buf = dst = None
                import gc
                gc.collect()
                out = None
            elif op == "cuda_allocated":  # CUDA memory this process still holds (after freeing what
                torch.cuda.ipc_collect()  # no other process has open any more)
                out = torch.cuda.memory_allocated(device)
            elif op == "unpin":
                engine.unpin_chunks(pinned)
                pinned = []
                out = engine.blocks.num_free == engine.blocks.num_blocks
            elif op == "pid":
                out = os.getpid()
            elif op == "close":  # close, drop everything, report what is left over
                tx.close()
                bufs.clear()
                pulls.clear()
                engine = tx = t = buf = flat = view = None  # the last references to the memory
                import gc
                gc.collect()
                if torch.cuda.is_initialized():
                    torch.cuda.ipc_collect()  # shared CUDA memory the consumer released
                out = leaks.left_over(before)
            elif op == "exit":
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown command {op!r}")
            conn.send(("ok", out))
        except Exception as e:  # reported to the test, which fails on it
            conn.send(("err", f"{e!r}\n{traceback.format_exc()}"))
