"""Binary quantizer speed and memory at d = 18: ours (tokenizers/binary.py LFQ) vs
vector-quantize-pytorch's LFQ, like for like: both compute the exact codebook entropy over all
2**18 codes.

Task: N tokens of 18 dimensions (no projections), quantize to signs, commitment loss and the
entropy regulariser (per-sample entropy - gamma x codebook entropy, inverse temperature 100),
straight-through output, then the backward pass to the input of
    loss = commitment + entropy + sum(quantized * w)
for a fixed random w; training mode on both sides, same inputs, same weights
(commitment 0.25, entropy 0.1, gamma 1), same number of CPU threads.

- Peer: LFQ(dim=18, codebook_size=2**18, num_codebooks=1, entropy_loss_weight=0.1,
  commitment_loss_weight=0.25, diversity_gamma=1) called with inv_temperature=100: the
  [N, 2**18] logits, softmax and entropies (its log clamps p at 1e-5). Each N runs in its own
  process under an address-space limit (--peer-mem-gib), so that a case too large for the
  machine fails with an allocation error instead of waking the kernel's OOM killer.
- Ours, like for like: LookupFreeQuantizer(18, 18, codebook_entropy='exact'): the exact
  codebook entropy from two [N, 2**9] half-code tables and their [2**9, 2**9] product
  (tokenizers/binary_entropy.py), per-sample entropy exact from the 18 per-bit entropies,
  jitted. Also shown, not in the ratio: ours with the grouped bound (two groups of 9 bits).

Time: median of --reps runs after one warm-up run (jit compilation excluded); the peer runs one
warm-up and --peer-reps timed runs. Memory: "rss" = peak resident memory during the warm-up
call above the value just before it (psutil, 1 ms sampling, the same function on both sides,
from benchmarks/quantizer_speed.py); "xla temp" = ours' scratch from XLA's memory analysis.

The last line is one JSON object: ratio = peer seconds / ours seconds (exact entropy) at
N = 1,024 (> 1: ours faster); mem_ratio = peer rss / ours rss there; the same at 4,096 when the
peer fits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import this_checkout  # noqa: E402

this_checkout.use()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from visual_tokenizers.benchmarks.quantizer_speed import device_name, gib, measure  # noqa: E402
from visual_tokenizers.tokenizers.binary import LookupFreeQuantizer  # noqa: E402

BITS, INV_T = 18, 100.0
PEER_NAME = "vector-quantize-pytorch LFQ"


def data(n):
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((n, BITS), dtype=np.float32) for _ in range(2))


def ours(n, reps, entropy="exact"):
    """(seconds, rss bytes, xla temp bytes) for one jitted forward + backward."""
    q = LookupFreeQuantizer(
        BITS, BITS, commitment_weight=0.25, entropy_weight=0.1, diversity_gamma=1.0,
        inverse_temperature=INV_T, codebook_entropy=entropy, entropy_group_bits=9,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    graphdef, params, rest = nnx.split(q, nnx.Param, ...)
    params, rest = params.to_pure_dict(), rest.to_pure_dict()  # as the trainer holds them

    def loss(z, rest, w):
        out = nnx.merge(graphdef, params, rest)(z, train=True)
        return sum(out.losses.values()) + jnp.vdot(out.quantized, w)

    z, w = (jnp.asarray(a) for a in data(n))
    step = jax.jit(jax.value_and_grad(loss)).lower(z, rest, w).compile()
    temp = step.memory_analysis().temp_size_in_bytes

    def run():
        jax.block_until_ready(step(z, rest, w))

    seconds, rss = measure(run, reps)
    return seconds, rss, temp


def peer(n, reps):
    """(seconds, rss bytes) for one forward + backward of the peer's LFQ, in this process."""
    import torch
    from vector_quantize_pytorch import LFQ

    torch.set_num_threads(os.cpu_count())  # XLA:CPU uses one thread per core too
    q = LFQ(
        dim=BITS, codebook_size=2**BITS, num_codebooks=1, entropy_loss_weight=0.1,
        commitment_loss_weight=0.25, diversity_gamma=1.0,
    )  # fmt: skip
    q.train()
    z, w = data(n)
    x, w = torch.from_numpy(z)[None].requires_grad_(), torch.from_numpy(w)[None]

    def run():
        x.grad = None
        quantized, _, aux = q(x, inv_temperature=INV_T)
        (aux + (quantized * w).sum()).backward()

    return measure(run, reps)


def peer_in_subprocess(n, reps, mem_gib):
    """(seconds, rss bytes) or (None, reason): the peer in a child process whose address space
    is limited to mem_gib, so that an oversized case fails by itself."""
    cmd = [sys.executable, os.path.abspath(__file__), "--peer-child", str(n)]
    cmd += ["--peer-reps", str(reps), "--peer-mem-gib", str(mem_gib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        result = json.loads(lines[-1])
        return result["seconds"], result["rss"]
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"failed (exit {done.returncode}) under a {mem_gib} GiB limit: {tail[:160]}"


def peer_child(n, reps, mem_gib):
    import resource

    limit = int(mem_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    seconds, rss = peer(n, reps)
    print(json.dumps({"seconds": seconds, "rss": rss}))


def line(who, n, seconds, rss, temp=None):
    text = f"{who:<26s} N={n:6d}: {n / seconds:10.0f} tok/s ({seconds:8.3f} s)  rss {gib(rss)}"
    return text + (f"  xla temp {gib(temp)}" if temp is not None else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="vs peer")
    parser.add_argument("--large", type=int, default=65536, help="ours alone")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--peer-reps", type=int, default=2)
    parser.add_argument("--peer-mem-gib", type=float, default=12.0, help="peer address space")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--peer-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_child:
        return peer_child(args.peer_child, args.peer_reps, args.peer_mem_gib)
    print(f"device: {device_name()}; jax {jax.__version__}; threads {os.cpu_count()}; d = {BITS}")
    print("task: sign quantize + commitment + entropy loss (t = 100), forward + backward")

    result = {"benchmark": "binary_speed", "unit": "tokens/s", "peer_name": PEER_NAME}
    for i, n in enumerate(args.tokens):
        sec, rss, temp = ours(n, args.reps)
        print(line("ours (exact, chunked)", n, sec, rss, temp), flush=True)
        g_sec, g_rss, g_temp = ours(n, args.reps, entropy="grouped")
        print(line("ours (grouped 2 x 9 bits)", n, g_sec, g_rss, g_temp), flush=True)
        psec, prss = (None, "not run") if args.no_peer else peer_in_subprocess(
            n, args.peer_reps, args.peer_mem_gib
        )  # fmt: skip
        if psec is None:
            print(f"{'peer':<26s} N={n:6d}: {prss}", flush=True)
        else:
            ratios = f"  time ratio {psec / sec:7.1f}  memory ratio {prss / rss:7.1f}"
            print(line("peer", n, psec, prss) + ratios, flush=True)
        key = "" if i == 0 else f"_{n}"
        result[f"ours{key}"] = round(n / sec, 1)
        result[f"peer{key}"] = round(n / psec, 1) if psec else None
        result[f"ratio{key}"] = round(psec / sec, 2) if psec else None
        result[f"mem_ratio{key}"] = round(prss / rss, 2) if psec else None
    l_sec, l_rss, l_temp = ours(args.large, max(1, args.reps // 2))
    print(line("ours (exact, chunked)", args.large, l_sec, l_rss, l_temp), flush=True)
    logits = args.large * 2**BITS * 4 / 1e9
    print(f"{'peer':<26s} N={args.large:6d}: not run, its logits alone are {logits:.1f} GB")
    result.update(large_tokens=args.large, large_rss_gib=round(l_rss / 2**30, 3))
    result["device"] = device_name()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
