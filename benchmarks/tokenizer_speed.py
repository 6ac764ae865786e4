"""Tokenizer speed: ours (configs/vqgan_f16.py, conv VQGAN + VQ) vs the official MaskGIT VQGAN.

Peer: `maskgit.nets.vqgan_tokenizer.VQVAE` with `vqgan_config` (PyPI `maskgit==0.0.1.dev0`,
flax.linen), `encode_to_indices` / `decode_from_indices` under `jax.jit`. Ours: the Tokenizer
that trained/builders.py builds from configs/vqgan_f16.py, `encode` / `decode` jitted as pure
functions over its `nnx.split` state. Both at 256x256 (16x16 tokens, 1024 x 256 codebook),
float32 (the official model's dtype; `--dtype=bfloat16` runs ours in bfloat16 for reference),
random weights: the official tree is filled with random values and copied into ours through the
documented name mapping (models/conv.py), so both compute the same function; the script checks
that the indices agree and reports the largest decode difference.

Time per case: median of --reps calls after one warm-up call, ours and peer alternating call by
call so that load on a shared machine hits both alike. Compile time: `lower().compile()` of
each function at each batch size. Last line: one JSON object; ratio = geometric mean over the
four cases (encode/decode x batch 1/8) of ours / peer images per second (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from functools import partial

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import this_checkout  # noqa: E402

this_checkout.use()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from maskgit.configs import vqgan_config  # noqa: E402
from maskgit.nets import vqgan_tokenizer  # noqa: E402

from visual_tokenizers.configs import vqgan_f16  # noqa: E402
from visual_tokenizers.models.conv import load_maskgit_params  # noqa: E402
from visual_tokenizers.trained import builders  # noqa: E402

PEER_NAME = "official MaskGIT VQGAN (maskgit==0.0.1.dev0, flax.linen, jax.jit)"
SIZE = 256


def random_params(abstract, seed=0):
    """Kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1), biases/codebook ~ N(0, 0.1)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape, dtype=np.float32)
        if path[-1].key == "kernel":
            return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray((1.0 if path[-1].key == "scale" else 0.0) + 0.1 * noise)

    return jax.tree.map_with_path(draw, abstract)


def build_peer():
    model = vqgan_tokenizer.VQVAE(config=vqgan_config.get_config(), train=False)

    def encode_decode(module, images):
        return module.decode(module.encode({"image": images})[0])

    images = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
    abstract = jax.eval_shape(
        lambda x: model.init(jax.random.PRNGKey(0), x, method=encode_decode), images
    )
    params = random_params(abstract["params"])
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_to_indices))
    decode = jax.jit(lambda p, i: model.apply({"params": p}, i, method=model.decode_from_indices))
    return params, encode, decode


def build_ours(peer_params, dtype):
    config = vqgan_f16.get_config()
    config.model.dtype = dtype
    tokenizer = nnx.eval_shape(builders.model_fn_from_config(config))
    load_maskgit_params(tokenizer.encoder, peer_params["encoder"])
    load_maskgit_params(tokenizer.decoder, peer_params["decoder"])
    state = nnx.state(tokenizer)
    for path, variable in nnx.to_flat_state(state):  # codebook and the quantizer's counters
        if path[-1] == "codebook":
            variable.set_value(peer_params["quantizer"]["codebook"])
        elif isinstance(variable.get_value(), jax.ShapeDtypeStruct):
            v = variable.get_value()
            variable.set_value(jnp.zeros(v.shape, v.dtype))
    nnx.update(tokenizer, state)
    graphdef, state = nnx.split(tokenizer)
    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
    decode = jax.jit(lambda s, i: nnx.merge(graphdef, s).decode(i))
    return state, encode, decode


def compile_seconds(fn, *args):
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return time.perf_counter() - start, compiled


def time_pair(ours, peer, reps):
    """Alternating calls; returns the median seconds of each side."""
    jax.block_until_ready(ours())
    jax.block_until_ready(peer())
    times = {"ours": [], "peer": []}
    for _ in range(reps):
        for name, fn in (("ours", ours), ("peer", peer)):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["ours"]), statistics.median(times["peer"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    cpu = platform.processor() or platform.machine()
    device = f"{jax.devices()[0].device_kind} ({cpu}, {os.cpu_count()} cores)"
    print(f"device: {device}; jax {jax.__version__}; ours dtype {args.dtype}", flush=True)

    peer_params, peer_encode, peer_decode = build_peer()
    our_state, our_encode, our_decode = build_ours(peer_params, args.dtype)
    rows, ratios = [], []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        images = jax.random.uniform(
            jax.random.PRNGKey(batch), (batch, SIZE, SIZE, 3), minval=-1, maxval=1
        )
        c_oe, oe = compile_seconds(our_encode, our_state, images)
        c_pe, pe = compile_seconds(peer_encode, peer_params, images)
        ours_idx, peer_idx = oe(our_state, images), pe(peer_params, images)
        agree = float(jnp.mean(ours_idx == peer_idx))
        c_od, od = compile_seconds(our_decode, our_state, peer_idx)
        c_pd, pd = compile_seconds(peer_decode, peer_params, peer_idx)
        diff = float(jnp.max(jnp.abs(od(our_state, peer_idx) - pd(peer_params, peer_idx))))
        cases = {
            "encode": (partial(oe, our_state, images), partial(pe, peer_params, images)),
            "decode": (partial(od, our_state, peer_idx), partial(pd, peer_params, peer_idx)),
        }
        compiles = {"encode": (c_oe, c_pe), "decode": (c_od, c_pd)}
        for name, (ours, peer) in cases.items():
            t_ours, t_peer = time_pair(ours, peer, args.reps)
            c_ours, c_peer = compiles[name]
            row = dict(
                case=f"{name} b{batch}",
                ours_img_s=batch / t_ours,
                peer_img_s=batch / t_peer,
                ratio=t_peer / t_ours,
                ours_compile_s=c_ours,
                peer_compile_s=c_peer,
            )
            rows.append(row)
            ratios.append(row["ratio"])
            print(
                f"{row['case']:10s} ours {batch / t_ours:8.3f} img/s  peer {batch / t_peer:8.3f}"
                f" img/s  ratio {row['ratio']:.3f}  compile ours {c_ours:.1f}s peer {c_peer:.1f}s",
                flush=True,
            )
        print(
            f"batch {batch}: index agreement {agree:.4f}, max |decode diff| {diff:.2e}", flush=True
        )
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    geo_ours = math.exp(statistics.mean(math.log(r["ours_img_s"]) for r in rows))
    geo_peer = math.exp(statistics.mean(math.log(r["peer_img_s"]) for r in rows))
    print(
        json.dumps(
            dict(
                benchmark="tokenizer_speed",
                unit="images/s (geometric mean of encode/decode x batch 1/8 at 256x256)",
                ours=round(geo_ours, 4),
                peer=round(geo_peer, 4),
                ratio=round(geo, 4),
                peer_name=PEER_NAME,
                device=device,
            )
        )
    )


if __name__ == "__main__":
    main()
