"""Evaluation throughput: FID Inception feature extraction (images/s), ours (both pipelines) vs
pytorch-fid, on the same images, batch 50.

Task: --num uint8 RGB images of --size x --size (default 256, the ImageNet 256 setting), in
batches of --batch (default 50, pytorch-fid's default batch size), to pool3 features.
- Peer: pytorch-fid (`pytorch_fid.inception.InceptionV3([3])`, resize and [-1, 1] inside the
  model) fed as `pytorch_fid.fid_score.get_activations` feeds it: float [0, 1] NCHW batches
  under `torch.no_grad()`, features copied to numpy.
- Ours: `trained.evaluation.inception_apply(path, mesh, pipeline)` as jobs/evaluate.py runs it
  (uint8 host batch -> jitted preprocess -> jitted network sharded over the mesh -> numpy
  'pool', 'logits' and 'spatial'), for `pytorch_fid` (like for like with the peer: in the
  ratio) and `adm` (shown), and both pipelines on each batch (what the evaluate job does).

Both sides use the same weights: seeded random values in pytorch-fid's layout by default
(extraction cost does not depend on them), or --weights=pt_inception-2015-12-05-6726825d.pth.
Time: median of --reps full passes after one warm-up pass (compilation excluded), ours and
peer alternating pass by pass so that load on a shared machine hits both alike. Last line:
one JSON object, ratio = ours / peer images per second (> 1: ours faster).
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import this_checkout  # noqa: E402

this_checkout.use()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_fid  # noqa: E402
import pytorch_fid.inception as pfi  # noqa: E402
import torch  # noqa: E402

from visual_tokenizers.core.runtime import mesh as mesh_lib  # noqa: E402
from visual_tokenizers.trained import evaluation  # noqa: E402

PEER_NAME = f"pytorch-fid {pytorch_fid.__version__} InceptionV3([3]) (torch {torch.__version__})"


def random_weights(path: str) -> dict:
    """pytorch-fid's FID Inception with seeded random weights, saved to `path`: He-scaled convs
    (torch's default init shrinks the features to ~1e-13 over 90 layers, which would make the
    parity line below meaningless)."""
    fetch = pfi.load_state_dict_from_url
    load = torch.nn.Module.load_state_dict
    pfi.load_state_dict_from_url = lambda *a, **k: None  # no download
    torch.nn.Module.load_state_dict = lambda self, *a, **k: None
    try:
        state = pfi.fid_inception_v3().state_dict()
    finally:
        pfi.load_state_dict_from_url, torch.nn.Module.load_state_dict = fetch, load
    rng = np.random.default_rng(0)
    for key, value in state.items():
        if key.endswith("conv.weight"):
            scale = np.sqrt(2.0 / np.prod(value.shape[1:]))
            state[key] = torch.tensor(rng.normal(0, scale, tuple(value.shape)), dtype=torch.float32)
    torch.save(state, path)
    return state


def build_peer(state: dict):
    fetch = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: state
    try:
        model = pfi.InceptionV3([3]).eval()
    finally:
        pfi.load_state_dict_from_url = fetch

    def run(batches):
        out = []
        with torch.no_grad():
            for images in batches:
                x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
                out.append(model(x)[0][:, :, 0, 0].numpy())
        return np.concatenate(out)

    return run


def build_ours(path: str, pipelines):
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "model": 1})
    applies = [evaluation.inception_apply(path, mesh, p)[0] for p in pipelines]

    def run(batches):
        return [np.concatenate([a(images)["pool"] for images in batches]) for a in applies]

    return run


def time_passes(fns: dict, batches, reps: int) -> dict:
    """Median seconds of a full pass per function, after one warm-up pass each; alternating."""
    for fn in fns.values():
        fn(batches)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(batches)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--weights", default="", help="pytorch-fid's weights file (else random)")
    args = parser.parse_args()
    cpu = platform.processor() or platform.machine()
    device = f"{jax.devices()[0].device_kind} ({cpu}, {os.cpu_count()} cores)"
    print(f"device: {device}; jax {jax.__version__}; {PEER_NAME}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        path = args.weights or os.path.join(folder, "random_inception.pth")
        state = torch.load(path) if args.weights else random_weights(path)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.num, args.size, args.size, 3), dtype=np.uint8)
        batches = [images[i : i + args.batch] for i in range(0, args.num, args.batch)]
        peer = build_peer(state)
        ours = {p: build_ours(path, (p,)) for p in ("pytorch_fid", "adm")}
        both = build_ours(path, ("adm", "pytorch_fid"))
        # Like for like: our pytorch_fid pipeline gives pytorch-fid's features.
        theirs = peer(batches[:1])
        gap = np.abs(ours["pytorch_fid"](batches[:1])[0] - theirs).max() / np.abs(theirs).max()
        print(f"pool3 on one batch: max |ours - peer| / max |peer| = {gap:.2e}", flush=True)
        fns = {"peer": peer, "ours_pytorch_fid": ours["pytorch_fid"], "ours_adm": ours["adm"]}
        times = time_passes({**fns, "ours_both": both}, batches, args.reps)
    rates = {name: args.num / t for name, t in times.items()}
    for name, rate in rates.items():
        print(f"{name:18s} {rate:8.2f} images/s ({times[name]:.2f} s per pass)", flush=True)
    print(
        f"both pipelines per batch (what jobs/evaluate.py does): {rates['ours_both']:.2f} "
        "images/s (not in the ratio)",
        flush=True,
    )
    ratio = rates["ours_pytorch_fid"] / rates["peer"]
    print(
        json.dumps(
            dict(
                benchmark="eval_speed",
                unit=f"images/s (pool3 features, {args.size}px uint8 -> 299, batch "
                f"{args.batch}, {args.num} images; ours = pytorch_fid pipeline, adm "
                f"{rates['ours_adm']:.2f}, both {rates['ours_both']:.2f})",
                ours=round(rates["ours_pytorch_fid"], 4),
                peer=round(rates["peer"], 4),
                ratio=round(ratio, 4),
                peer_name=PEER_NAME,
                device=device,
            )
        )
    )


if __name__ == "__main__":
    main()
