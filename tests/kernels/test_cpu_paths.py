"""t2i_engine.kernels.cpu_paths: each CPU fast path chosen per machine, timed once, cached.

Truths: the paired timer against callables of known durations; the cache against what was
written (a second select times nothing); every dispatcher against the path's switch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import torch

from t2i_engine.kernels import cpu_paths
from t2i_engine.kernels.cpu_paths import PATHS, Choice

ALL_OFF = {p: Choice(p, False, 1.2) for p in PATHS}


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[None]:
    monkeypatch.setenv("T2I_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(cpu_paths.CPU_PATHS_ENV, "auto")
    cpu_paths.reset()
    yield
    cpu_paths.reset()


@pytest.fixture
def timings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """measure() replaced by a fake that turns every path off and counts its calls."""
    calls: list[int] = []

    def fake() -> dict[str, Choice]:
        calls.append(1)
        return dict(ALL_OFF)

    monkeypatch.setattr(cpu_paths, "measure", fake)
    return calls


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_paired_ratio_of_known_durations() -> None:
    ratios = cpu_paths.paired_ratios(lambda: _spin(0.005), lambda: _spin(0.015), pairs=5, clock=time.process_time)
    assert len(ratios) == 5 and all(0.25 < r < 0.45 for r in ratios)  # 1/3: CPU time, which other processes on the machine do not inflate


def test_one_thread_times_cpu_not_wall() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu_paths.default_clock() is time.process_time
        torch.set_num_threads(2)
        assert cpu_paths.default_clock() is time.perf_counter
    finally:
        torch.set_num_threads(threads)


def test_first_select_times_and_caches_then_reads(timings: list[int]) -> None:
    # nothing selected yet: every path this CPU can run is on
    assert all(cpu_paths.enabled(p) for p in PATHS if cpu_paths.unsupported_reason(p) is None)
    choices = cpu_paths.select()
    assert choices == ALL_OFF and timings == [1]
    assert not any(cpu_paths.enabled(p) for p in PATHS)
    saved = json.loads(cpu_paths.cache_file().read_text())
    assert saved["machines"][cpu_paths.machine_key()]["dense_fp32"] == {"enabled": False, "ratio": 1.2}
    cpu_paths.reset()
    assert cpu_paths.select() == ALL_OFF and timings == [1]  # read back, not timed again


def test_a_second_select_keeps_this_process_choice(timings: list[int]) -> None:
    cpu_paths.select()
    cpu_paths.cache_file().unlink()
    assert cpu_paths.select() == ALL_OFF  # neither read again nor timed again
    assert timings == [1] and not cpu_paths.cache_file().exists()


def test_measure_policy_times_again(timings: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_paths.select()
    monkeypatch.setenv(cpu_paths.CPU_PATHS_ENV, "measure")
    cpu_paths.select()
    assert timings == [1, 1]


def test_the_key_holds_the_thread_count(timings: list[int]) -> None:
    threads = torch.get_num_threads()
    assert cpu_paths.machine_key(threads) != cpu_paths.machine_key(threads + 1)
    cpu_paths.select()
    torch.set_num_threads(threads + 1)
    try:
        cpu_paths.select()
    finally:
        torch.set_num_threads(threads)
    assert timings == [1, 1]
    assert len(json.loads(cpu_paths.cache_file().read_text())["machines"]) == 2


def test_fixed_and_off_time_nothing(timings: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_paths.CPU_PATHS_ENV, "fixed")
    assert all(c.enabled for c in cpu_paths.select().values())
    monkeypatch.setenv(cpu_paths.CPU_PATHS_ENV, "off")
    assert not any(c.enabled for c in cpu_paths.select().values())
    cpu_paths.reset()
    assert not cpu_paths.enabled("dense_fp32")  # off holds before any select too
    assert timings == [] and not cpu_paths.cache_file().exists()


def test_bad_policy_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_paths.CPU_PATHS_ENV, "fastest")
    with pytest.raises(cpu_paths.CpuPathsError, match="T2I_CPU_PATHS='fastest'"):
        cpu_paths.select()


def test_a_corrupt_or_foreign_cache_is_timed_again(timings: list[int]) -> None:
    file = cpu_paths.cache_file()
    file.parent.mkdir(parents=True)
    file.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        cpu_paths.select()
    data = json.loads(file.read_text())
    data["machines"][cpu_paths.machine_key()] = {"dense_fp32": {"enabled": True, "ratio": 0.5}}  # paths of another version
    file.write_text(json.dumps(data))
    cpu_paths.reset()
    cpu_paths.select()
    assert timings == [1, 1]


def test_an_earlier_format_is_timed_again_without_a_warning(timings: list[int]) -> None:
    """Format 1's convolution probes packed for another shape than they ran (a wrong ratio on AVX2)."""
    import warnings

    file = cpu_paths.cache_file()
    file.parent.mkdir(parents=True)
    entry = {p: {"enabled": True, "ratio": 0.5} for p in PATHS}
    file.write_text(json.dumps({"format": cpu_paths.FORMAT - 1, "machines": {cpu_paths.machine_key(): entry}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_paths.select() == ALL_OFF
    assert timings == [1] and json.loads(file.read_text())["format"] == cpu_paths.FORMAT


def test_an_unwritable_cache_warns_and_still_selects(timings: list[int], monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("T2I_CACHE_DIR", str(blocker / "sub"))
    with pytest.warns(UserWarning, match="could not save"):
        cpu_paths.select()
    assert not cpu_paths.enabled("attention_bf16_short")


def test_real_measure_gives_a_consistent_choice_per_path() -> None:
    choices = cpu_paths.measure()
    assert set(choices) == set(PATHS)
    for c in choices.values():
        if c.ratio is not None:
            assert c.ratio > 0 and c.enabled == (c.ratio < cpu_paths.KEEP_BELOW)


def _select(monkeypatch: pytest.MonkeyPatch, **on: bool) -> None:
    monkeypatch.setattr(cpu_paths, "measure", lambda: {p: Choice(p, on.get(p, True), None) for p in PATHS})
    monkeypatch.setenv(cpu_paths.CPU_PATHS_ENV, "measure")
    cpu_paths.select()


def test_dense_dispatch_follows_its_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from t2i_engine.kernels.dense import onednn_unsupported_reason

    from t2i_engine.kernels.dense.dispatch import onednn_available

    if not onednn_available():
        pytest.skip("PyTorch without oneDNN")
    x, w = torch.randn(16, 8), torch.randn(4, 8)
    with torch.no_grad():
        _select(monkeypatch, dense_fp32=False)
        assert "off on this machine" in (onednn_unsupported_reason(x, w) or "")
        cpu_paths.reset()
        _select(monkeypatch, dense_fp32=True)
        assert onednn_unsupported_reason(x, w) is None


def test_training_dense_follows_its_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from t2i_engine.kernels.dense.dispatch import onednn_training_unsupported_reason

    x, w = torch.randn(16, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    _select(monkeypatch, dense_fp32_train=False)
    assert "off on this machine" in (onednn_training_unsupported_reason(x, w) or "")
    cpu_paths.reset()
    _select(monkeypatch, dense_fp32_train=True)
    assert onednn_training_unsupported_reason(x, w) is None


def test_training_selects_on_the_cpu(timings: list[int], tmp_path) -> None:
    from tests.training.tiny_denoiser import DictDataset, TinyDenoiser

    from t2i_engine.training.config import TrainConfig
    from t2i_engine.training.loop import fit

    fit(TinyDenoiser(), DictDataset(), TrainConfig(accelerator="cpu", progress_bar=False, batch_size=4, max_steps=1,
                                                   checkpoint_every=0), output_dir=tmp_path / "run", seed=0)
    assert timings == [1] and cpu_paths.cache_file().exists()
    assert not cpu_paths.enabled("dense_fp32_train")  # what the (fake) timing said


@pytest.mark.parametrize("dtype,path", [(torch.float32, "conv_pack_fp32"), (torch.bfloat16, "conv_pack_bf16")])
def test_packing_follows_its_switch(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, path: str) -> None:
    from t2i_engine.kernels.dense.dispatch import onednn_available
    from t2i_engine.nn import ops
    from t2i_engine.nn.cpu_inference import pack_conv_weights

    if not onednn_available():
        pytest.skip("PyTorch without oneDNN packs nothing")

    def net() -> torch.nn.Module:
        return torch.nn.Sequential(ops.Conv2d(8, 8, 3, padding=1), ops.Conv2d(8, 8, 3, padding=1)).to(dtype)

    if cpu_paths.unsupported_reason(path):
        pytest.skip(f"this CPU cannot pack {dtype}: {cpu_paths.unsupported_reason(path)}")

    _select(monkeypatch, **{path: False})
    assert pack_conv_weights(net(), min_in_channels=1) == 0
    cpu_paths.reset()
    _select(monkeypatch, **{path: True})
    assert pack_conv_weights(net(), min_in_channels=1) == 2


@pytest.mark.parametrize("dtype,path", [(torch.float32, "linear_pack_fp32"), (torch.bfloat16, "linear_pack_bf16")])
def test_linear_packing_follows_its_switch(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, path: str) -> None:
    from t2i_engine.kernels.dense.dispatch import onednn_available
    from t2i_engine.nn import ops
    from t2i_engine.nn.cpu_inference import pack_linear_weights

    if not onednn_available() or cpu_paths.unsupported_reason(path):
        pytest.skip(f"this CPU cannot pack {dtype} linears")

    def net() -> torch.nn.Module:
        return torch.nn.Sequential(ops.Linear(8, 16), torch.nn.Linear(16, 8), ops.Linear(8, 4)).to(dtype)

    _select(monkeypatch, **{path: False})
    assert pack_linear_weights(net()) == 0
    cpu_paths.reset()
    _select(monkeypatch, **{path: True})
    packed = net()
    assert pack_linear_weights(packed) == 2  # the engine's ops.Linear only
    assert packed[0].weight.is_mkldnn and not packed[1].weight.is_mkldnn


@pytest.mark.parametrize("tokens,path", [(8, "attention_bf16_short"), (520, "attention_bf16_long")])
def test_attention_dispatch_follows_its_switch(monkeypatch: pytest.MonkeyPatch, tokens: int, path: str) -> None:
    from t2i_engine.kernels.attention import dispatch

    used: list[int] = []
    real = dispatch.bmm_attention
    monkeypatch.setattr(dispatch, "bmm_attention", lambda *a, **k: used.append(1) or real(*a, **k))
    q = torch.randn(1, 2, tokens, 4).bfloat16()
    other = next(p for p in PATHS if p.startswith("attention") and p != path)
    with torch.no_grad():
        _select(monkeypatch, **{path: False, other: True})
        off = dispatch.attention(q, q, q)
        cpu_paths.reset()
        _select(monkeypatch, **{path: True, other: False})
        on = dispatch.attention(q, q, q)
    assert used == [1]
    torch.testing.assert_close(off.float(), on.float(), atol=2e-2, rtol=0)


def _cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@pytest.mark.skipif(not __import__("os").path.exists("/proc/cpuinfo"), reason="reads /proc/cpuinfo")
def test_bf16_packing_support_follows_the_cpu_flags() -> None:
    """oneDNN's bf16 weight reorder needs AVX-512 BW+VL+DQ or AVX-NE-CONVERT (its error says so);
    the flags in /proc/cpuinfo are the independent truth of which this CPU has."""
    from t2i_engine.kernels.dense.dispatch import onednn_available

    if not onednn_available():
        pytest.skip("PyTorch without oneDNN")
    flags = _cpu_flags()
    capable = {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags
    assert (cpu_paths.unsupported_reason("conv_pack_bf16") is None) == capable
    assert cpu_paths.unsupported_reason("conv_pack_fp32") is None


def test_an_unsupported_path_is_off_untimed_and_never_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU whose oneDNN refuses the bf16 reorder (AVX2 only): measure() must not crash (it did
    on an AMD Zen 3), the path is off with no ratio, and even the ``fixed`` policy keeps it off."""
    from t2i_engine.kernels.dense import dispatch
    from t2i_engine.nn import ops
    from t2i_engine.nn.cpu_inference import pack_conv_weights

    real = dispatch.pack_conv_weight

    def refuse_bf16(weight: torch.Tensor, **kw: object) -> torch.Tensor:
        if weight.dtype == torch.bfloat16:
            raise RuntimeError("mkldnn_reorder_conv2d_weight: bf16 path needs the cpu support avx512bw")
        return real(weight, **kw)

    monkeypatch.setattr(dispatch, "pack_conv_weight", refuse_bf16)
    cpu_paths.reset()
    assert "avx512bw" in (cpu_paths.unsupported_reason("conv_pack_bf16") or "")
    monkeypatch.setattr(cpu_paths, "PAIRS", 1)
    choices = cpu_paths.measure()
    if dispatch.onednn_available():
        assert choices["conv_pack_bf16"] == Choice("conv_pack_bf16", False, None)
        assert choices["conv_pack_fp32"].ratio is not None  # the other paths are still timed
    monkeypatch.setenv(cpu_paths.CPU_PATHS_ENV, "fixed")
    cpu_paths.select()
    assert not cpu_paths.enabled("conv_pack_bf16") and cpu_paths.enabled("conv_pack_fp32") == dispatch.onednn_available()
    net = torch.nn.Sequential(ops.Conv2d(8, 8, 3, padding=1)).to(torch.bfloat16)
    assert pack_conv_weights(net, min_in_channels=1) == 0


def test_prepare_for_inference_selects_on_the_cpu(timings: list[int]) -> None:
    from t2i_engine.nn import ops
    from t2i_engine.tasks.common import prepare_for_inference

    class Model:
        text_encoder = autoencoder = None
        denoiser = torch.nn.Sequential(ops.Conv2d(640, 8, 3, padding=1))

    prepare_for_inference(Model())  # type: ignore[arg-type]
    assert timings == [1] and cpu_paths.cache_file().exists()
    assert not Model.denoiser[0].weight.is_mkldnn  # the machine said packing does not pay


def test_cpu_description_names_the_cpu_as_lscpu_does():
    """What the benchmarks print: the model name and CPU count lscpu reports (an independent reader)."""
    import shutil
    import subprocess

    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    if shutil.which("lscpu") is None or not cpuinfo.exists() or "model name" not in cpuinfo.read_text():
        pytest.skip("no lscpu, or a /proc/cpuinfo without model names (the name then comes from platform)")
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, env={"LC_ALL": "C"}).stdout
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    text = cpu_paths.cpu_description()
    assert text.startswith(fields["Model name"]) and text.endswith(f", {fields['CPU(s)']} CPUs")
