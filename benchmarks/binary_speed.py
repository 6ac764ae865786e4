"""Binary quantizer speed and memory at d = 18: ours (tokenizers/binary.py LFQ) vs
vector-quantize-pytorch's LFQ.

Task: N tokens of 18 dimensions (no projections), quantize to signs, commitment loss and the
entropy regulariser (per-sample entropy - gamma x codebook entropy, inverse temperature 100),
straight-through output, then the backward pass to the input of
    loss = commitment + entropy + sum(quantized * w)
for a fixed random w; training mode on both sides, same inputs, same weights
(commitment 0.25, entropy 0.1, gamma 1), same number of CPU threads, same process.

- Peer: LFQ(dim=18, codebook_size=2**18, num_codebooks=1, entropy_loss_weight=0.1,
  commitment_loss_weight=0.25, diversity_gamma=1) called with inv_temperature=100. It builds the
  [N, 2**18] logits and softmax, so it only runs N = 1,024 here (about 5 GB).
- Ours: LookupFreeQuantizer(18, 18, entropy_group_bits=9): per-sample entropy exact from the
  18 per-bit entropies, codebook entropy over two groups of 9 bits ([N, 512] each), jitted.
  Also shown, not in the ratio: ours with one group of all 18 bits (the exact codebook
  entropy, [N, 2**18] like the peer) at N = 1,024, and ours at N = 65,536, where the peer's
  logits alone would be 68.7 GB.

Time: median of --reps runs after one warm-up run (jit compilation excluded); the peer runs
one warm-up and --peer-reps timed runs. Memory: "rss" = peak resident memory during the warm-up
call above the value just before it (psutil, 1 ms sampling, same method both sides, from
benchmarks/quantizer_speed.py); "xla temp" = ours' scratch from XLA's memory analysis.

The last line is one JSON object; ratio = peer seconds / ours seconds at N = 1,024 (> 1: ours
faster).
"""

from __future__ import annotations

import argparse
import json
import os
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


def ours(n, reps, group_bits=9):
    """(seconds, rss bytes, xla temp bytes) for one jitted forward + backward."""
    q = LookupFreeQuantizer(
        BITS, BITS, commitment_weight=0.25, entropy_weight=0.1, diversity_gamma=1.0,
        inverse_temperature=INV_T, entropy_group_bits=group_bits, rngs=nnx.Rngs(0),
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
    """(seconds, rss bytes) for one forward + backward of the peer's LFQ."""
    import torch
    from vector_quantize_pytorch import LFQ

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


def line(who, n, seconds, rss, temp=None):
    text = f"{who:<28s} N={n:6d}: {n / seconds:10.0f} tok/s ({seconds:8.3f} s)  rss {gib(rss)}"
    return text + (f"  xla temp {gib(temp)}" if temp is not None else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="shared case (peer fits)")
    parser.add_argument("--large", type=int, default=65536, help="ours alone")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--peer-reps", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--no-exact", action="store_true", help="skip ours with one group")
    args = parser.parse_args()
    n = args.tokens
    threads = os.cpu_count()
    print(f"device: {device_name()}; jax {jax.__version__}; threads {threads}; d = {BITS}")
    print("task: sign quantize + commitment + entropy loss (t = 100), forward + backward")

    sec, rss, temp = ours(n, args.reps)
    print(line("ours (2 groups of 9 bits)", n, sec, rss, temp), flush=True)
    if not args.no_exact:
        e_sec, e_rss, e_temp = ours(n, args.reps, group_bits=BITS)
        print(line("ours (1 group, exact)", n, e_sec, e_rss, e_temp), flush=True)
    psec = None
    if not args.no_peer:
        import torch

        torch.set_num_threads(threads)  # XLA:CPU uses one thread per core too
        psec, prss = peer(n, args.peer_reps)
        print(line("peer", n, psec, prss) + f"  ratio {psec / sec:7.1f}", flush=True)
    l_sec, l_rss, l_temp = ours(args.large, max(1, args.reps // 2))
    print(line("ours (2 groups of 9 bits)", args.large, l_sec, l_rss, l_temp), flush=True)
    logits = args.large * 2**BITS * 4 / 1e9
    print(f"{'peer':<28s} N={args.large:6d}: not run, its logits alone are {logits:.1f} GB")

    result = {
        "benchmark": "binary_speed",
        "unit": "tokens/s",
        "ours": round(n / sec, 1),
        "peer": round(n / psec, 1) if psec else None,
        "ratio": round(psec / sec, 2) if psec else None,
        "peer_name": PEER_NAME,
        "device": device_name(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
