"""MaskGIT sampling speed: ours (models/maskgit.py) vs the official MaskGIT transformer and
parallel decoding, class-conditional, tokens only.

Task: class-conditional generation of --grid x --grid tokens (default 16x16 = 256, the 256x256
ImageNet setting) in --steps parallel-decoding steps (default 8), batch --batch (default 8),
choice temperature 4.5, cosine schedule, no classifier-free guidance (the official sampler has
none). Images/s counts generated token grids: the tokenizer's decode to pixels is NOT included
on either side.

- Peer: `maskgit==0.0.1.dev0` (PyPI, flax.linen), `maskgit.nets.maskgit_transformer.Transformer`
  as the official `maskgit_class_cond_config` builds it (vocabulary codebook + classes + 1,
  257 positions, post-norm BERT layers) and `maskgit.libml.parallel_decode.decode` with the
  class token in front, under `jax.jit`, as `maskgit/inference.py` calls it (tokens only).
  Only these two modules are imported (the package's nets/discriminator.py does not parse).
- Ours: `MaskGIT(vocab=Vocab(codebook))` of the same size, sampled by `make_sampler` (jit of a
  pure function over the `nnx.split` state). `--architecture=official`: ours is
  `OfficialMaskGIT` (models/maskgit_official.py) carrying the peer's own weights, serialised
  as the released checkpoints are and imported by trained/official_maskgit.py: the same
  network on both sides, so the ratio measures the samplers. `--draws=official` also makes
  ours draw its random numbers as the official decode (same tokens: checked).

Both use random weights (sampling cost does not depend on them) and float32 by default
(`--dtype=bfloat16` runs ours in bfloat16, for reference only: the ratio is then not like for
like). Defaults are MaskGIT size (24 layers, width 768, 16 heads, MLP 3072); `--layers`,
`--width`, ... shrink it for small machines.

Time: median of --reps calls after one warm-up call, ours and peer alternating call by call so
that load on a shared machine hits both alike. Compile: `lower().compile()` of each sampler.
`--guidance=S` also times ours with classifier-free guidance at scale S (twice the transformer
work; shown, not in the ratio). Last line: one JSON object, ratio = ours / peer images per
second (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import this_checkout  # noqa: E402

this_checkout.use()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx, serialization  # noqa: E402
from maskgit.libml import parallel_decode  # noqa: E402
from maskgit.nets import maskgit_transformer  # noqa: E402

from visual_tokenizers.benchmarks.tokenizer_speed import compile_seconds, time_pair  # noqa: E402
from visual_tokenizers.core.tokens.layout import Vocab  # noqa: E402
from visual_tokenizers.models.maskgit import MaskGIT, make_sampler  # noqa: E402
from visual_tokenizers.models.maskgit_official import (  # noqa: E402
    OfficialMaskGIT,
    official_param_names,
)
from visual_tokenizers.trained import official_maskgit as importer  # noqa: E402

PEER_NAME = "official MaskGIT transformer + parallel_decode (maskgit==0.0.1.dev0, jax.jit)"
CHOICE_TEMPERATURE = 4.5


def build_peer(args):
    """Official transformer with random weights and its jitted sampler (tokens only)."""
    length = args.grid**2
    model = maskgit_transformer.Transformer(
        vocab_size=args.codebook + args.classes + 1,
        hidden_size=args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.mlp,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=length + 1,
    )
    dummy = jnp.zeros((1, length + 1), jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), dummy)["params"]

    def sample(params, labels, rng):
        # As maskgit/inference.py: the class token (shifted past the codebook), then masks (-1).
        inputs = jnp.concatenate(
            [labels[:, None] + args.codebook, jnp.full((labels.shape[0], length), -1)], 1
        ).astype(jnp.int32)

        def tokens_to_logits(seq):
            logits = model.apply({"params": params}, seq, deterministic=True)
            return logits[..., : args.codebook]

        seqs = parallel_decode.decode(
            inputs, rng, tokens_to_logits, num_iter=args.steps,
            choice_temperature=CHOICE_TEMPERATURE, mask_token_id=-1,
        )  # fmt: skip
        return seqs[:, -1, 1:].reshape(-1, args.grid, args.grid)

    return params, jax.jit(sample)


def imported_peer(build, peer_params):
    """The peer's weights written as a released checkpoint is, imported into `build()`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "maskgit_checkpoint")
        with open(path, "wb") as f:
            f.write(serialization.to_bytes({"params": peer_params}))
        model = importer.abstract_model(build)
        variables, _ = importer.read_checkpoint(path, "transformer")
        importer.copy_params(model, variables, official_param_names(model), path)
    return nnx.split(model, nnx.Param, ...)


def build_ours(args, guidance=None, peer_params=None):
    """Our MaskGIT (random weights initialised under jit, or the peer's at the official
    architecture) and its jitted sampler."""
    cls = OfficialMaskGIT if args.architecture == "official" else MaskGIT

    def build():
        return cls(
            vocab=Vocab(args.codebook), token_shape=(args.grid, args.grid),
            num_classes=args.classes, width=args.width, depth=args.layers, heads=args.heads,
            mlp_dim=args.mlp, dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(0),
        )  # fmt: skip

    if args.architecture == "official":
        graphdef, params, rest = imported_peer(build, peer_params)
    else:
        graphdef = nnx.split(nnx.eval_shape(build), nnx.Param, ...)[0]
        params, rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[1:])()
    options = dict(choice_temperature=CHOICE_TEMPERATURE, guidance_scale=guidance)
    if args.draws == "official":
        options["rng"] = "official"
    return params, rest, make_sampler(graphdef, steps=args.steps, **options)


def time_one(fn, reps):
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--mlp", type=int, default=3072)
    parser.add_argument("--grid", type=int, default=16, help="tokens per side (16: 256 tokens)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--codebook", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--guidance", type=float, default=None, help="also time ours with CFG")
    parser.add_argument(
        "--architecture", default="ours", choices=["ours", "official"],
        help="official: ours is OfficialMaskGIT with the peer's weights imported",
    )  # fmt: skip
    parser.add_argument(
        "--draws", default="ours", choices=["ours", "official"],
        help="official: ours draws as parallel_decode (same tokens at --architecture=official)",
    )  # fmt: skip
    return parser.parse_args()


def main():
    args = parse_args()
    cpu = platform.processor() or platform.machine()
    device = f"{jax.devices()[0].device_kind} ({cpu}, {os.cpu_count()} cores)"
    print(f"device: {device}; jax {jax.__version__}; ours dtype {args.dtype}", flush=True)
    print(
        f"task: {args.batch} x {args.grid}x{args.grid} tokens, {args.steps} steps, "
        f"{args.layers} layers x {args.width} (heads {args.heads}, mlp {args.mlp}), "
        f"codebook {args.codebook}, {args.classes} classes; tokens only (no pixel decode)",
        flush=True,
    )
    peer_params, peer_sample = build_peer(args)
    our_params, our_rest, our_sample = build_ours(args, peer_params=peer_params)
    print(f"params: ours {count_params(our_params):,}, peer {count_params(peer_params):,}")
    labels = jnp.arange(args.batch, dtype=jnp.int32) % args.classes
    key = jax.random.PRNGKey(0)
    c_ours, ours = compile_seconds(our_sample, our_params, our_rest, labels, key)
    c_peer, peer = compile_seconds(peer_sample, peer_params, labels, key)
    print(f"compile: ours {c_ours:.1f} s, peer {c_peer:.1f} s", flush=True)
    outputs = {
        "ours": ours(our_params, our_rest, labels, key),
        "peer": peer(peer_params, labels, key),
    }
    for name, tokens in outputs.items():
        lo, hi = int(tokens.min()), int(tokens.max())
        assert 0 <= lo and hi < args.codebook, f"{name} produced tokens outside the codebook"
    if args.architecture == "official" and args.draws == "official":
        same = float(jnp.mean(outputs["ours"] == outputs["peer"]))
        print(f"same network, official draws: {same:.4f} of the tokens equal", flush=True)
        assert same == 1.0, "ours and the official sampler disagree on the same network"
    t_ours, t_peer = time_pair(
        partial(ours, our_params, our_rest, labels, key), partial(peer, peer_params, labels, key),
        args.reps,
    )  # fmt: skip
    ours_rate, peer_rate = args.batch / t_ours, args.batch / t_peer
    print(
        f"ours {ours_rate:8.3f} img/s ({t_ours:.2f} s/batch)  peer {peer_rate:8.3f} img/s "
        f"({t_peer:.2f} s/batch)  ratio {ours_rate / peer_rate:.3f}",
        flush=True,
    )
    if args.guidance is not None:
        g_params, g_rest, g_sample = build_ours(args, args.guidance, peer_params)
        c_g, guided = compile_seconds(g_sample, g_params, g_rest, labels, key)
        t_g = time_one(partial(guided, g_params, g_rest, labels, key), args.reps)
        print(
            f"ours with guidance {args.guidance}: {args.batch / t_g:8.3f} img/s "
            f"(compile {c_g:.1f} s; not in the ratio)",
            flush=True,
        )
    print(
        json.dumps(
            dict(
                benchmark="sampling_speed",
                unit=f"images/s (tokens only, {args.grid}x{args.grid}, T={args.steps}, "
                f"batch {args.batch}, {args.layers}x{args.width}, ours {args.architecture})",
                ours=round(ours_rate, 4),
                peer=round(peer_rate, 4),
                ratio=round(ours_rate / peer_rate, 4),
                peer_name=PEER_NAME,
                device=device,
            )
        )
    )


if __name__ == "__main__":
    main()
