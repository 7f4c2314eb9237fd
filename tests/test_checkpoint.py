"""Checkpoints are files from the internet: every bad one is a DiffxError naming it, none runs code,
and no save, interrupted or out of disk, loses the previous checkpoint."""

import errno
import json
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from diffx import checkpoint, resume
from diffx.errors import DiffxError


@pytest.fixture
def ckpt(tiny_run, tmp_path):
    """A private copy of a real trained checkpoint."""
    path = tmp_path / "model.safetensors"
    shutil.copy(tiny_run / "model.safetensors", path)
    return path


def split(path):
    """A safetensors file -> (header dict, tensor bytes): 8-byte little-endian length, JSON, data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def join(path, header, data):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit(path, fn):
    """Rewrite a checkpoint's header with ``fn(header, meta, config, spec)``, keeping it valid safetensors."""
    header, data = split(path)
    meta = header["__metadata__"]
    raw_config, raw_spec = meta["config"], meta["spec"]
    config, spec = json.loads(raw_config), json.loads(raw_spec)
    fn(header, meta, config, spec)
    # config/spec edited as objects are written back; set as raw strings (or None: removed) they stay so
    if meta.get("config") == raw_config:
        meta["config"] = json.dumps(config)
    if meta.get("spec") == raw_spec:
        meta["spec"] = json.dumps(spec)
    header["__metadata__"] = {k: v for k, v in meta.items() if v is not None}
    join(path, header, data)


def rejected(path, *words):
    """The loader refuses ``path`` with one DiffxError line naming the file (and ``words``)."""
    with pytest.raises(DiffxError) as e:
        checkpoint.load(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message, message
    for w in words:
        assert w in message, message
    return message


def test_a_real_checkpoint_loads(ckpt):
    parts, c = checkpoint.load(ckpt)
    assert c.step == 2 and c.spec.image_size == 8
    assert not any(p.is_meta for p in parts.model.parameters()) and not any(b.is_meta for b in parts.model.buffers())


# --- fuzz: random bytes, truncations, corrupted headers ---------------------------------------------

def test_random_bytes_and_every_truncation_are_rejected(ckpt, tmp_path):
    rng = random.Random(0)
    raw = ckpt.read_bytes()
    bad = tmp_path / "bad.safetensors"
    blobs = [b"", b"\0", rng.randbytes(7), rng.randbytes(8), rng.randbytes(4096), rng.randbytes(len(raw))]
    blobs += [struct.pack("<Q", n) + rng.randbytes(256) for n in (0, 2, 100, 255, 2**40, 2**64 - 1)]
    blobs += [raw[: len(raw) * k // 20] for k in range(20)]  # every 1/20th of the real file
    blobs += [raw[:-1], raw[:8] + raw[9:]]
    for blob in blobs:
        bad.write_bytes(blob)
        rejected(bad)


def _corruptions():
    """(name, edit) pairs that break a real checkpoint's header or metadata in one way each."""
    def tensor(header):  # the first weight's header entry
        return header[sorted(k for k in header if k != "__metadata__")[0]]

    def transpose(h, m, c, s):
        t = next(v for k, v in h.items() if k != "__metadata__" and len(v["shape"]) == 2 and v["shape"][0] != v["shape"][1])
        t["shape"] = t["shape"][::-1]  # same byte size, wrong shape

    def rename(h, m, c, s):
        k = sorted(k for k in h if k != "__metadata__")[0]
        h[k + "_renamed"] = h.pop(k)

    def set_meta(**kv):
        return lambda h, m, c, s: m.update(kv)

    def set_config(fn):
        return lambda h, m, c, s: fn(c)

    def set_spec(**kv):
        return lambda h, m, c, s: s.update(kv)

    return [
        ("shape transposed", transpose, "wrong shape"),
        ("tensor renamed", rename, "missing"),
        ("dtype int", lambda h, m, c, s: tensor(h).update(dtype="I32"), "wrong dtype"),
        ("wider model in config", set_config(lambda c: c["model"].update(channels=16)), "wrong shape"),
        ("other model in config", set_config(lambda c: c.update(model={"_target_": "diffx.models.mmdit.MMDiT",
                                                                        "width": 32, "depth": 1, "heads": 2})), "missing"),
        ("bad model option", set_config(lambda c: c["model"].update(heads=3, attn_resolutions=[8])), "model.heads"),
        ("unknown model key", set_config(lambda c: c["model"].update(bogus=1)), "model.bogus"),
        ("model key of the wrong type", set_config(lambda c: c["model"].update(channels="8")), "model.channels"),
        ("no format", set_meta(format=None), "format"),
        ("foreign format", set_meta(format="pt"), "format"),
        ("newer format", set_meta(format="diffx.model/2"), "diffx.model/2"),
        ("no config", set_meta(config=None), "config"),
        ("config not json", set_meta(config="{not json"), "malformed"),
        ("config a list", set_meta(config="[]"), "config"),
        ("config too deep", set_meta(config="[" * 100000 + "]" * 100000), "malformed"),
        ("no model section", set_config(lambda c: c.pop("model")), "model"),
        ("step not a number", set_meta(step="two"), "malformed"),
        ("negative step", set_meta(step="-1"), "step"),
        ("no version", set_meta(diffx_version=None), "diffx_version"),
        ("spec not json", set_meta(spec="nope"), "malformed"),
        ("spec a string", set_meta(spec='"x"'), "spec"),
        ("spec extra key", set_spec(evil=1), "spec"),
        ("spec huge image", set_spec(image_size=10**9), "spec.image_size"),
        ("spec bool channels", set_spec(channels=True), "spec.channels"),
        ("spec class names", set_spec(class_names=["a"]), "class names"),
        ("header length +1", None, None),
        ("header bytes random", None, None),
    ]


@pytest.mark.parametrize("name,fn,word", _corruptions(), ids=[c[0] for c in _corruptions()])
def test_corrupted_header_or_metadata_is_rejected(ckpt, name, fn, word):
    if fn is None:  # byte-level damage to the header itself
        raw = bytearray(ckpt.read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        if name == "header length +1":
            raw[:8] = struct.pack("<Q", n + 1)
        else:
            raw[8: 8 + n] = random.Random(1).randbytes(n)
        ckpt.write_bytes(bytes(raw))
    else:
        edit(ckpt, fn)
    rejected(ckpt, *([word] if word else []))


# --- crafted configs: nothing is imported or run ---------------------------------------------------

def _crafted(sentinel):
    touch = f"touch {sentinel}"
    return {
        "os.system": lambda c: c.update(model={"_target_": "os.system", "command": touch}),
        "builtins.eval": lambda c: c.update(model={"_target_": "builtins.eval", "_args_": [f"open({str(sentinel)!r}, 'w')"]}),
        "subprocess.Popen": lambda c: c.update(model={"_target_": "subprocess.Popen", "args": ["touch", str(sentinel)]}),
        "nested target": lambda c: c["objective"].update(t_sampler={"_target_": "os.system", "_partial_": True,
                                                                    "command": touch}),
        "target in a list": lambda c: c["model"].update(attn_resolutions=[{"_target_": "os.system", "command": touch}]),
        "target deep in a dict": lambda c: c["model"].update(extra={"a": {"_target_": "os.system", "command": touch}}),
        "non-string target": lambda c: c["model"].update(_target_=["os", "system"]),
        "dict target": lambda c: c["model"].update(_target_={"_target_": "os.system", "command": touch}),
        "diffx class at the wrong place": lambda c: c.update(model={"_target_": "diffx.data.shapes",
                                                                    "cache_dir": str(sentinel)}),
        "partial flipped": lambda c: c["model"].update(_partial_=True),
        "hydra _args_": lambda c: c["model"].update(_args_=[touch]),
        "hydra _recursive_": lambda c: c["model"].update(_recursive_=False),
        "env interpolation": lambda c: c["model"].update(channels="${oc.env:HOME}"),
        "custom resolver": lambda c: c["model"].update(channels="${diffx_test_touch:}"),
        "escaped interpolation": lambda c: c["schedule"].update(family="\\${oc.env:HOME}"),
        "missing value": lambda c: c["model"].update(channels="???"),
    }


@pytest.mark.parametrize("name", list(_crafted("x")))
def test_crafted_config_is_refused_and_runs_nothing(ckpt, tmp_path, name):
    sentinel = tmp_path / "pwned"
    OmegaConf.register_new_resolver("diffx_test_touch", lambda: sentinel.touch() or 8, replace=True)

    edit(ckpt, lambda h, m, c, s: _crafted(sentinel)[name](c))
    with pytest.raises(DiffxError) as e:
        checkpoint.read_header(ckpt)  # refused from the metadata alone, before anything is built
    assert str(ckpt) in str(e.value) and "refusing" in str(e.value)
    rejected(ckpt)
    assert not sentinel.exists()


def test_os_system_target_never_reaches_hydra(ckpt, tmp_path, monkeypatch):
    """The allow-list runs before instantiate: Hydra is not even asked to locate the target."""
    import hydra.utils

    calls = []
    monkeypatch.setattr(hydra.utils, "instantiate", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(checkpoint, "build", lambda *a, **k: calls.append(a))
    edit(ckpt, lambda h, m, c, s: c.update(model={"_target_": "os.system", "command": "true"}))
    rejected(ckpt, "os.system")
    assert calls == []


# --- resume state: pickle only through the weights-only unpickler ----------------------------------

class _Evil:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def test_resume_state_with_a_malicious_pickle_runs_nothing(tmp_path):
    sentinel, run = tmp_path / "pwned", tmp_path / "run"
    state = run / resume.STATE
    state.mkdir(parents=True)
    net = torch.nn.Linear(2, 2)
    for name in ("model", "ema"):
        save_file(net.state_dict(), str(state / f"{name}.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(state / "rng.safetensors"))
    (state / "optimizer.pt").write_bytes(pickle.dumps(_Evil(sentinel), protocol=2))
    (state / "trainer.json").write_text(json.dumps({"step": 1, "ema_updates": 1, "scheduler": {}}))

    class Stub:
        model, updates = torch.nn.Linear(2, 2), 0

        @staticmethod
        def unwrap_model(m):
            return m

    optimizer = torch.optim.AdamW(net.parameters())
    with pytest.raises(DiffxError, match="resume state"):
        resume.load_state(run, Stub, net, Stub, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1))
    assert not sentinel.exists()


# --- saving: atomic, disk full, killed mid-write ----------------------------------------------------

def test_save_writes_a_temp_file_fsyncs_it_then_renames(ckpt, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.basename(a))), real_replace(a, b))[1])
    c = checkpoint.read(ckpt)
    checkpoint.save(ckpt, c.weights, c.parts, c.spec, step=3)
    assert events == ["fsync", ("replace", f".{ckpt.name}.tmp-{os.getpid()}"), "fsync"]  # file, rename, directory
    assert checkpoint.read(ckpt).step == 3


def test_disk_full_while_saving_keeps_the_previous_checkpoint(ckpt, monkeypatch):
    before = ckpt.read_bytes()
    c = checkpoint.read(ckpt)

    def half_then_enospc(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(before[: len(before) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", half_then_enospc)
    with pytest.raises(OSError) as e:
        checkpoint.save(ckpt, c.weights, c.parts, c.spec, step=3)
    assert e.value.errno == errno.ENOSPC
    assert ckpt.read_bytes() == before
    assert checkpoint.load(ckpt)[1].step == 2
    assert [p.name for p in ckpt.parent.iterdir()] == [ckpt.name]  # no temp file left behind


_WRITER = """
import sys, torch
from diffx import checkpoint
c = checkpoint.read(sys.argv[1])
big = {**c.weights, "pad": torch.zeros(16 * 2**20)}  # 64 MB: a write that takes a while
print("ready", flush=True)
for step in range(100):
    checkpoint.save(sys.argv[1], big, c.parts, c.spec, step)
"""


def test_killing_a_save_midway_leaves_the_previous_checkpoint_loadable(ckpt):
    before = ckpt.read_bytes()
    for _ in range(3):  # the kill lands mid-write almost always; retry the rare time it does not
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(ckpt)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        tmp = ckpt.with_name(f".{ckpt.name}.tmp-{proc.pid}")
        deadline = time.monotonic() + 60
        while not tmp.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if tmp.exists():
            break
        ckpt.write_bytes(before)
    assert tmp.exists(), "never caught the writer mid-write"
    assert ckpt.read_bytes() == before
    assert checkpoint.load(ckpt)[1].step == 2
