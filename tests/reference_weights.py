"""Random-weight reference networks (torch) for parity tests, saved as .pth files.

No download happens: pytorch-fid's FID Inception is built with its weight loading patched out and
filled with seeded random values; the LPIPS VGG trunk is the package's random (`pnet_rand`) one.
"""

from __future__ import annotations

import contextlib

import numpy as np


@contextlib.contextmanager
def _no_download():
    """pytorch-fid's fid_inception_v3() without its download and weight loading."""
    import pytorch_fid.inception as pfi
    import torch

    fetch, load = pfi.load_state_dict_from_url, torch.nn.Module.load_state_dict
    pfi.load_state_dict_from_url = lambda *a, **k: None
    torch.nn.Module.load_state_dict = lambda self, *a, **k: None
    try:
        yield pfi
    finally:
        pfi.load_state_dict_from_url, torch.nn.Module.load_state_dict = fetch, load


def random_inception_state(seed: int = 0) -> dict:
    """A state dict for pytorch-fid's FID Inception with activations of order one.

    He-scaled convs and non-trivial BatchNorm statistics, so every layer and the BN folding
    matter; integer num_batches_tracked entries are kept as torch writes them.
    """
    import torch

    with _no_download() as pfi:
        skeleton = pfi.fid_inception_v3()
    rng = np.random.default_rng(seed)
    state = {}
    for key, value in skeleton.state_dict().items():
        shape = tuple(value.shape)
        if key.endswith("conv.weight"):
            array = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        elif key.endswith(("bn.weight", "running_var")):
            array = rng.uniform(0.5, 1.5, shape)
        elif key.endswith(("bn.bias", "running_mean")):
            array = rng.normal(0, 0.2, shape)
        elif key == "fc.weight":
            array = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
        elif key == "fc.bias":
            array = rng.normal(0, 0.1, shape)
        else:
            state[key] = value
            continue
        state[key] = torch.tensor(array, dtype=torch.float32)
    return state


def save_random_inception(path: str, seed: int = 0) -> dict:
    import torch

    state = random_inception_state(seed)
    torch.save(state, path)
    return state


def pytorch_fid_models(state: dict):
    """(pytorch-fid InceptionV3 returning pool3, the full FID Inception with its fc) in eval."""
    import pytorch_fid.inception as pfi

    fetch = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: state
    try:
        return pfi.InceptionV3([3]).eval(), pfi.fid_inception_v3().eval()
    finally:
        pfi.load_state_dict_from_url = fetch


def random_lpips(vgg_path: str):
    """lpips.LPIPS(net='vgg') with a random VGG trunk, whose weights go to `vgg_path` with
    torchvision's key names (features.N.weight/bias); the calibration comes from the wheel."""
    import lpips
    import torch

    torch.manual_seed(0)
    model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    vgg = {}
    for name, value in model.net.state_dict().items():
        _, index, kind = name.split(".")  # sliceK.<torchvision index>.weight
        vgg[f"features.{index}.{kind}"] = value.clone()
    torch.save(vgg, vgg_path)
    return model
