"""Checkpoint I/O: atomic writes survive SIGKILL, strict loading, safe unpickling, fsspec."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap

import fsspec
import pytest
import torch
from torch import nn

from t2i_engine.checkpoint.io import (
    atomic_write_bytes,
    load_safetensors,
    load_state_dict_strict,
    safe_torch_load,
    save_safetensors,
    save_torch,
)
from t2i_engine.errors import CheckpointError
from t2i_engine.training.checkpoints import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

# Saves step 1, then starts step 2 with os.fsync patched to announce itself and hang on its
# N-th call: the process is killed with the bytes of one file written under its temporary name.
CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from t2i_engine.training.checkpoints import save_checkpoint
    ckpt, hang_at = sys.argv[1], int(sys.argv[2])
    def state(v):
        return dict(model_state={"w": torch.full((64, 64), v)}, ema_state={"w": torch.full((64, 64), v)},
                    train_state={"step": int(v), "batches": int(v)}, keep_last=3)
    save_checkpoint(ckpt, 1, **state(1.0))
    real, calls = os.fsync, [0]
    def fsync(fd):
        calls[0] += 1
        if calls[0] == hang_at:
            print("WRITING", flush=True)
            time.sleep(600)
        real(fd)
    os.fsync = fsync
    save_checkpoint(ckpt, 2, **state(2.0))
""")


@pytest.mark.parametrize("hang_at", [1, 3, 4])  # model file, state file, the "latest" pointer
def test_kill_during_checkpoint_write_keeps_previous_latest_and_loadable(tmp_path, hang_at):
    ckpt = str(tmp_path / "ckpt")
    p = subprocess.Popen([sys.executable, "-c", CHILD, ckpt, str(hang_at)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "WRITING"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert latest_checkpoint(ckpt) == 1
    model, ema, state = load_checkpoint(ckpt, 1, with_ema=True)
    assert torch.equal(model["w"], torch.full((64, 64), 1.0)) and state["step"] == 1
    staged = [n for n in os.listdir(tmp_path / "ckpt") if n.startswith(".step-000000002.partial-")]
    if hang_at == 4:  # the complete folder was renamed into place; only "latest" was not moved yet
        assert list_checkpoints(ckpt) == [1, 2] and not staged
    else:  # killed while writing: no step-000000002 folder at all, only the hidden staging one
        assert list_checkpoints(ckpt) == [1] and len(staged) == 1
    if hang_at == 1:  # only the temporary name of the model file exists
        names = os.listdir(tmp_path / "ckpt" / staged[0])
        assert len(names) == 1 and names[0].startswith(".model.safetensors.tmp-")
    save_checkpoint(ckpt, 2, model_state={"w": torch.full((64, 64), 2.0)}, ema_state=None,
                    train_state={"step": 2}, keep_last=3)  # the resumed run saves step 2 again
    assert latest_checkpoint(ckpt) == 2 and load_checkpoint(ckpt, 2, with_ema=False)[2] == {"step": 2}
    assert not [n for n in os.listdir(tmp_path / "ckpt") if ".partial-" in n]  # debris pruned


def test_atomic_write_and_safetensors_round_trip_on_memory_fs():
    url = "memory://t2i-test/ckpt/weights.safetensors"
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    save_safetensors(tensors, url, metadata={"k": "v"})
    back = load_safetensors(url)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    fs = fsspec.filesystem("memory")
    assert [p.rsplit("/", 1)[1] for p in fs.ls("/t2i-test/ckpt", detail=False)] == ["weights.safetensors"]
    atomic_write_bytes(url, b"x")  # overwrite in place
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_safetensors(url)


def test_local_safetensors_round_trip_and_errors(tmp_path):
    """A local file (memory-mapped) loads what safetensors' own writer saved, every dtype and
    shape; a missing file, a folder and a corrupt file each fail naming the path."""
    from safetensors.torch import save_file

    from t2i_engine.errors import StorageError

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.ones(2, 2, dtype=torch.bfloat16),
               "d": torch.randn(4, dtype=torch.float16), "e": torch.zeros(0, 3)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    back = load_safetensors(str(path))
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    back["a"].add_(1.0)  # the loaded tensors are the caller's to change, not the file's
    assert torch.equal(load_safetensors(str(path))["a"], tensors["a"])
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*missing.safetensors"):
        load_safetensors(str(tmp_path / "missing.safetensors"))
    with pytest.raises(StorageError, match="cannot read .*Is a directory"):
        load_safetensors(str(tmp_path))
    path.write_bytes(path.read_bytes()[:-9])  # truncated
    with pytest.raises(CheckpointError, match="w.safetensors is not a readable safetensors"):
        load_safetensors(str(path))


_PEAK = """
import sys, torch
from t2i_engine.checkpoint.io import load_safetensors

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size: earlier peaks would mask this one
before = status("VmRSS")
w = load_safetensors(sys.argv[1])
touched = sum(float(v.sum()) for v in w.values())  # every page of every tensor in memory
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status peaks")
def test_local_safetensors_load_holds_the_weights_once(tmp_path):
    """Loading a local 256 MiB file raises the peak resident memory by about its size, not twice
    (the file's bytes and the tensors made from them)."""
    from safetensors.torch import save_file

    path = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.randn(4 << 20) for i in range(16)}, str(path))  # 16 x 16 MiB
    size = path.stat().st_size
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) < 1.3 * size


def test_checkpoints_keep_last_and_latest_on_memory_fs():
    ckpt = "memory://t2i-test/run/checkpoints"
    for step in (1, 2, 3, 4):
        save_checkpoint(ckpt, step, model_state={"w": torch.tensor([float(step)])}, ema_state=None,
                        train_state={"step": step}, keep_last=2)
    assert list_checkpoints(ckpt) == [3, 4] and latest_checkpoint(ckpt) == 4
    model, ema, state = load_checkpoint(ckpt, 3, with_ema=False)
    assert model["w"].item() == 3.0 and ema is None and state == {"step": 3}


def test_strict_loading_lists_missing_unexpected_and_shape_mismatch():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    state = dict(net.state_dict())
    state.pop("1.bias")
    state["extra.weight"] = torch.zeros(1)
    state["0.weight"] = torch.zeros(4, 2)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_strict(net, state, source="x.safetensors")
    msg = str(e.value)
    assert "missing keys (1): 1.bias" in msg and "unexpected keys (1): extra.weight" in msg
    assert "0.weight: (4, 2) vs (3, 2)" in msg
    good = {k: torch.ones_like(v) for k, v in net.state_dict().items()}
    load_state_dict_strict(net, good)
    assert torch.equal(net[0].weight, torch.ones(3, 2))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_safe_torch_load_refuses_arbitrary_pickles(tmp_path):
    ok = tmp_path / "ok.pt"
    save_torch({"step": 3, "t": torch.ones(2), "nested": [1, (2, 3)]}, str(ok))
    assert safe_torch_load(str(ok))["step"] == 3
    bad = tmp_path / "bad.ckpt"
    buf = io.BytesIO()
    torch.save({"x": _Evil()}, buf)
    bad.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="weights_only=True"):
        safe_torch_load(str(bad))
    with pytest.raises(CheckpointError, match="not found"):
        safe_torch_load(str(tmp_path / "missing.pt"))


def test_read_json_object_names_every_bad_config(tmp_path):
    from t2i_engine.checkpoint.io import read_json_object
    from t2i_engine.errors import CheckpointError

    good = tmp_path / "config.json"
    good.write_text('{"a": 1}')
    assert read_json_object(good) == {"a": 1}
    assert read_json_object(tmp_path / "absent.json", required=False) == {}
    for name, text, why in (("absent.json", None, "is missing"), ("bad.json", "{", "not a readable JSON"),
                            ("list.json", "[1]", "does not hold a JSON object")):
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(CheckpointError, match=rf"{name}.*{why}|{why}"):
            read_json_object(tmp_path / name)
