"""Shared fixtures: tiny random HF models of each family, converted once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _jaxlib_version() -> tuple[int, ...]:
    """jaxlib's (major, minor), read without importing JAX (XLA_FLAGS must be set first)."""
    from importlib.metadata import version
    return tuple(int(part) for part in version("jaxlib").split(".")[:2])


def _accelerator_plugin_installed() -> bool:
    """Whether JAX will find a GPU or TPU: a jaxlib plugin for one is installed and
    JAX_PLATFORMS does not hold JAX to the CPU (read without importing JAX)."""
    from importlib.metadata import distributions
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    names = {(dist.metadata["Name"] or "").lower().replace("_", "-") for dist in distributions()}
    return any(name.startswith(("jax-cuda", "jax-rocm", "libtpu")) for name in names)


# Eight CPU devices for the sharding tests (set before JAX starts; other tests use device 0).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The suite's time is compiling (tiny models run in microseconds), so: LLVM without its
# optimization passes (a quarter less compile time; the programs still run the same HLO), and
# a compilation cache on disk, so that a program compiled again after the per-module
# `jax.clear_caches()` below, or by a CLI subprocess, is loaded instead. One cache per
# process: JAX's file cache does not lock between concurrent writers (pytest-xdist workers).
# The flags only where JAX runs on the CPU alone: they hold for every backend, and XLA's GPU
# backend has refused optimization levels below 2 (on the GPU machines, gpu_session.sh runs
# the kernel tests compiled for the GPU).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"] and not _accelerator_plugin_installed():
    # Also XLA:CPU's older loop emitters and no expensive LLVM passes: together a fifth less
    # compile time again (test_speculative's layer-skip and lookup sweeps: 52 s -> 39 s).
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    # jaxlib 0.11 dropped the older emitters, and XLA aborts the process on a flag it does not
    # know, so the flag goes only to the jaxlib versions that have it.
    if _jaxlib_version() < (0, 11):
        os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
# Tried and left (2026-12-07, on a 2-core host where the suite took 1137 s with -n 2): one
# cache for both workers (safe only with JAX_COMPILATION_CACHE_MAX_SIZE set, which makes JAX
# lock it), 1117 s, within the noise: the two workers' modules share few programs; and
# JAX_DISABLE_MOST_OPTIMIZATIONS=1, 57 s -> 52 s for test_greedy_draft_tree_equals_plain.
_xla_cache = tempfile.mkdtemp(prefix="jaxdec-tests-xla-cache-")
atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"

import pytest

import jaxdec
from jaxdec.convert import convert
from tests.hf_models import FAMILIES, TINY_VOCAB_SIZE, build_hf_model, load_hf_model


# The slowest modules, slowest first (seconds summed per module, `python -m pytest -q -n 2
# --durations=0`: 318, 307, 260, 182, 120, 110, 108, 99, 95 of 1906 in all). pytest-xdist hands
# whole modules to its two workers in collection order (pyproject.toml's addopts); started
# last, test_readme's one 2-minute test ran alone while the other worker sat idle.
SLOWEST_MODULES = ("test_speculative.py", "test_sparse_self.py", "test_sharding.py", "test_speculative_sampling.py",
                   "test_readme.py", "test_benchmarks.py", "test_overlap.py", "test_heads.py", "test_cli.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    # Marked from the fixtures, not by hand: a test that asks for the `torch` fixture, itself or
    # through another (build_hf, hf_dirs and every fixture above them), needs torch;
    # `-m "not torch"` leaves those out where it is missing.
    for item in items:
        if "torch" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.torch)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. XLA:CPU maps memory for every
    executable it JIT-compiles; a whole run keeps thousands of them (every method, shape
    bucket and tree) and late in the run LLVM fails with "Cannot allocate memory" (mapping
    limits, not RAM). Programs shared between modules are recompiled, which costs less."""
    yield
    import gc
    import jax
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def loaded_models(monkeypatch):
    """A list that collects, in order, every model and head set `jaxdec.load` and
    `jaxdec.load_heads` return during the test (they still load for real): what a command
    line loaded, and in which dtype."""
    import jaxdec
    loaded = []
    for name in ("load", "load_heads"):
        real = getattr(jaxdec, name)
        monkeypatch.setattr(jaxdec, name, lambda *a, _real=real, **k: loaded.append(_real(*a, **k)) or loaded[-1])
    return loaded


@pytest.fixture
def small_prefill_chunks(monkeypatch):
    """Prompts read 4 tokens at a time (jaxdec.model.PREFILL_CHUNK is read when a prefill is
    traced, so the compiled programs are dropped before and after)."""
    import jax
    import jaxdec.model
    jax.clear_caches()
    monkeypatch.setattr(jaxdec.model, "PREFILL_CHUNK", 4)
    yield
    monkeypatch.undo()
    jax.clear_caches()


def _lowering(monkeypatch, backend: str, platform: str, chip):
    """lower(fn, *args) -> the text of fn lowered for `platform`, with the backend query
    answering `backend` (the kernels pick that formulation) and an abstract mesh of `chip`
    standing in for the device the lowering asks about."""
    import jax
    from jax.sharding import AbstractMesh
    monkeypatch.setattr(jax, "default_backend", lambda: backend)

    def lower(fn, *args):
        with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=chip)):
            # A fresh jit of a fresh function: no trace cached for the CPU to reuse.
            return jax.jit(lambda *a: fn(*a)).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return lower


@pytest.fixture
def lower_for_tpu(monkeypatch):
    """lower(fn, *abstract args) -> the text of fn lowered for a TPU, with no TPU here: Mosaic
    TPU asks about the chip, a TPU v5e here. Compiling needs a TPU."""
    from jax.sharding import AbstractDevice
    return _lowering(monkeypatch, "tpu", "tpu", AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu"))


@pytest.fixture
def lower_for_gpu(monkeypatch):
    """lower(fn, *args) -> the text of fn lowered for CUDA, with no GPU here: since JAX 0.11
    Pallas's Triton lowering asks for the GPU's compute capability, an H100's here (JAX 0.10
    asked nothing). Compiling needs a GPU."""
    from jax.sharding import AbstractDevice
    return _lowering(monkeypatch, "gpu", "cuda", AbstractDevice(device_kind="NVIDIA H100", num_cores=None,
                                                                platform="gpu"))


@pytest.fixture
def mosaic_gpu_interpret():
    """`interpret` for the Mosaic GPU kernels: None on a GPU (compiled and run for real, as
    gpu_session.sh runs these tests), elsewhere Mosaic GPU's interpreter (public from JAX 0.11)."""
    import jax
    if jax.default_backend() == "gpu":
        return None
    from jax.experimental.pallas import mosaic_gpu as plgpu
    if hasattr(plgpu, "InterpretGPUParams"):
        return plgpu.InterpretGPUParams()
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # JAX 0.10
    return InterpretGPUParams()


@pytest.fixture(scope="session")
def torch():
    """The torch module: the tests and fixtures that need torch (or transformers) ask for it
    here rather than importing it, so they are marked `torch` (pytest_collection_modifyitems)."""
    import torch
    return torch


@pytest.fixture(scope="session")
def build_hf(torch):
    """tests.hf_models.build_hf_model (it saves a random transformers model)."""
    return build_hf_model


@pytest.fixture(scope="session")
def hf_dirs(build_hf, tmp_path_factory):
    """family -> folder of a saved random HF model (with tokenizer.json)."""
    root = tmp_path_factory.mktemp("hf")
    return {family: build_hf(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def converted_dirs(hf_dirs, tmp_path_factory):
    """family -> folder of that model converted by jaxdec.convert."""
    root = tmp_path_factory.mktemp("converted")
    return {family: convert(path, root / family, progress=False) for family, path in hf_dirs.items()}


@pytest.fixture(scope="session")
def models(converted_dirs):
    """family -> loaded jaxdec.Model (float32)."""
    return {family: jaxdec.load(path) for family, path in converted_dirs.items()}


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory, build_hf):
    """A tiny random Llama with a 4096-token context (the shared one has 256)."""
    root = tmp_path_factory.mktemp("long_llama")
    hf = build_hf(root / "hf", "llama", seed=2, max_position_embeddings=4096)
    return jaxdec.load(convert(hf, root / "converted", progress=False))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, build_hf):
    """Target (2 layers) and a different random draft (1 layer), vocabulary 8, no tokenizer."""
    root = tmp_path_factory.mktemp("spec_vocab8")
    out = {}
    for name, seed, layers in (("target", 3, 2), ("draft", 4, 1)):
        hf = build_hf(root / f"hf_{name}", "llama", seed=seed, vocab_size=TINY_VOCAB_SIZE, num_hidden_layers=layers)
        os.remove(hf / "tokenizer.json")  # its 128 ids do not fit a vocabulary of 8
        out[name] = jaxdec.load(convert(hf, root / name, progress=False))
        assert out[name].config.vocab_size == TINY_VOCAB_SIZE and out[name].tokenizer is None
    return out


@pytest.fixture(scope="session")
def hf_models(hf_dirs):
    """family -> the transformers model (torch, CPU, float32)."""
    return {family: load_hf_model(path) for family, path in hf_dirs.items()}


@pytest.fixture(scope="session")
def llama(models):
    """The tiny Llama model, for tests that need just one model."""
    return models["llama"]
