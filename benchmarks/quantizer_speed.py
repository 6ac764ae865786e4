"""Quantizer speed and memory: ours (jitted VectorQuantizer) vs vector-quantize-pytorch.

Task per case: N vectors of dimension D against K codes: nearest-code search, commitment +
codebook losses, straight-through output, then the backward pass (gradients to the input and
the codebook) of  loss = commitment + codebook + sum(quantized * w)  for a fixed random w.
Both sides run in training mode with a gradient-trained codebook and no EMA / dead-code
updates (ours: use_ema=False; peer: VectorQuantize(learnable_codebook=True, ema_update=False,
threshold_ema_dead_code=0, rotation_trick=False)), same codebook values and inputs, same
number of CPU threads, in the same process. Time: median of --reps runs after one warm-up
run (jit compilation excluded for ours).

Memory, reported two ways:
- "rss": peak resident set size during the warm-up call above the value just before it,
  sampled every 1 ms by a background thread with psutil, for both sides (the same method;
  large CPU buffers of both XLA and torch are mmap-ed per call and unmapped after it, so the
  peak is visible; the 0.5 s pause before lets the previous call's buffers go).
- "xla temp" (ours only): temp_size_in_bytes from jax's ahead-of-time
  .lower().compile().memory_analysis(), the scratch XLA allocates for one call.

The peer builds the full N x K distance matrix (plus a one-hot matrix of the same size), so
for K = 16,384 it cannot run 65,536 vectors in this machine's memory; it then runs on
--peer-entries / K vectors, ours runs on that N as well, and the ratio uses that equal-N pair
(ours at the full N is printed too). Ours alone then runs 262,144 codes (dim 8), where the
peer's 65,536 x 262,144 float32 distance matrix alone would take 68.7 GB.

A CPU benchmark: JAX_PLATFORMS defaults to cpu here and torch runs on the CPU.

The last line is one JSON object; ratio = geometric mean over the four shared cases of
ours / peer throughput (vectors per second), > 1 meaning ours is faster.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import this_checkout  # noqa: E402

this_checkout.use()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from flax import nnx  # noqa: E402

from visual_tokenizers.tokenizers.vq import VectorQuantizer  # noqa: E402

CASES = [(1024, 8), (1024, 256), (16384, 8), (16384, 256)]
PEER_NAME = "vector-quantize-pytorch VectorQuantize"


def peak_rss(fn):
    """Runs fn(); returns the peak RSS above the starting value, in bytes."""
    proc, stop = psutil.Process(), threading.Event()
    time.sleep(0.5)  # buffers of the previous call are unmapped a moment after it returns
    base = proc.memory_info().rss
    peak = [base]

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    return max(peak[0], proc.memory_info().rss) - base


def measure(fn, reps):
    """(median seconds over reps, peak RSS bytes); the warm-up run is the one measured for RSS."""
    rss = peak_rss(fn)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), rss


def data(n, k, d):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((n, d), dtype=np.float32)
    w = rng.standard_normal((n, d), dtype=np.float32)
    return z, w


def ours(n, k, d, reps, codes=None):
    """Returns (seconds, rss bytes, xla temp bytes, codebook used)."""
    vq = VectorQuantizer(d, k, beta=0.25, rngs=nnx.Rngs(0))
    if codes is not None:
        vq.codebook[...] = jnp.asarray(codes)
    graphdef, params, rest = nnx.split(vq, nnx.Param, ...)
    params, rest = params.to_pure_dict(), rest.to_pure_dict()  # as the trainer holds them

    def loss(params, rest, z, w):
        out = nnx.merge(graphdef, params, rest)(z, train=True)  # train: usage EMA (K floats)
        return sum(out.losses.values()) + jnp.vdot(out.quantized, w)

    z, w = (jnp.asarray(a) for a in data(n, k, d))
    grad = jax.value_and_grad(loss, argnums=(0, 2))
    step = jax.jit(grad).lower(params, rest, z, w).compile()
    temp = step.memory_analysis().temp_size_in_bytes

    def run():
        jax.block_until_ready(step(params, rest, z, w))

    seconds, rss = measure(run, reps)
    return seconds, rss, temp, np.asarray(vq.codebook[...])


def peer(n, k, d, reps, codes):
    """Returns (seconds, rss bytes)."""
    import torch
    from vector_quantize_pytorch import VectorQuantize

    vq = VectorQuantize(
        dim=d, codebook_size=k, commitment_weight=0.25, learnable_codebook=True,
        ema_update=False, threshold_ema_dead_code=0, rotation_trick=False, kmeans_init=False,
    )  # fmt: skip
    with torch.no_grad():
        vq.codebook = torch.from_numpy(codes.copy())
    vq.train()
    z, w = data(n, k, d)
    x, w = torch.from_numpy(z)[None].requires_grad_(), torch.from_numpy(w)[None]

    def run():
        x.grad = None
        vq.zero_grad(set_to_none=True)
        quantized, _, loss = vq(x)
        (loss + (quantized * w).sum()).backward()

    return measure(run, reps)


def device_name():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"cpu: {os.cpu_count()} cores, {model}"


def gib(b):
    return f"{b / 2**30:6.2f} GiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4,096 vectors, 1 rep: smoke run")
    parser.add_argument("--vectors", type=int, default=65536)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peer-entries", type=int, default=2**27, help="peer N x K cap")
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args()
    n, reps = (4096, 1) if args.quick else (args.vectors, args.reps)

    threads = os.cpu_count()
    if not args.no_peer:
        import torch

        torch.set_num_threads(threads)  # XLA:CPU uses one thread per core too
    print(f"device: {device_name()}; jax {jax.__version__}; threads {threads}; N = {n}")
    print("task: nearest code + commitment/codebook losses, forward + backward, train mode")
    ratios, ours_rates, peer_rates = [], [], []
    for k, d in CASES:
        sec, rss, temp, codes = ours(n, k, d, reps)
        line = f"K={k:6d} D={d:3d} ours N={n}: {n / sec:10.0f} vec/s ({sec:7.3f} s)"
        print(f"{line}  rss {gib(rss)}  xla temp {gib(temp)}", flush=True)
        if args.no_peer:
            continue
        pn = min(n, max(1, args.peer_entries // k))
        if pn != n:
            sec, rss, temp, _ = ours(pn, k, d, reps, codes)
            line = f"K={k:6d} D={d:3d} ours N={pn}: {pn / sec:10.0f} vec/s ({sec:7.3f} s)"
            print(f"{line}  rss {gib(rss)}  xla temp {gib(temp)}", flush=True)
        psec, prss = peer(pn, k, d, reps, codes)
        line = f"K={k:6d} D={d:3d} peer N={pn}: {pn / psec:10.0f} vec/s ({psec:7.3f} s)"
        print(f"{line}  rss {gib(prss)}   ratio {psec / sec:5.2f}", flush=True)
        ratios.append(psec / sec)
        ours_rates.append(pn / sec)
        peer_rates.append(pn / psec)

    k = 2**18
    sec, rss, temp, _ = ours(n, k, 8, 1)  # ~40 s a run on 2 cores: one timed run
    line = f"K={k:6d} D=  8 ours N={n}: {n / sec:10.0f} vec/s ({sec:7.3f} s)"
    print(f"{line}  rss {gib(rss)}  xla temp {gib(temp)}", flush=True)
    print(f"K={k:6d} D=  8 peer: not run, its distance matrix alone is {n * k * 4 / 1e9:.1f} GB")

    geo = lambda xs: math.exp(sum(map(math.log, xs)) / len(xs))
    result = {
        "benchmark": "quantizer_speed",
        "unit": "vectors/s",
        "ours": round(geo(ours_rates), 1) if ours_rates else None,
        "peer": round(geo(peer_rates), 1) if peer_rates else None,
        "ratio": round(geo(ratios), 3) if ratios else None,
        "peer_name": PEER_NAME,
        "device": device_name(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
