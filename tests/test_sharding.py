"""Sharding over a ("data", "model") mesh of 8 CPU devices (conftest sets XLA_FLAGS): every
method's greedy output on a mesh equals one device's plain decoding; parameters and the cache
are really split where the shapes divide and replicated where they don't; the Pallas kernel
runs under shard_map; two processes (jax.distributed over gloo) run the CLI as one program."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxdec
from jaxdec import sharding, steps
from jaxdec.cache import init_cache
from jaxdec.heads import heads_on_mesh
from jaxdec.loading import model_from_params, on_mesh as on_mesh_
from jaxdec.sampling import SamplingParams, row_keys

# Ragged text prompts for the demo models: five rows pad to a batch of 8, which every data
# axis divides.
PROMPTS = ["def add(a, b):", "import os\nimport sys\n\ndef main():", "class Stack:\n    def __init__(self):",
           "for i in range(10):", "    return"]
MAX_NEW = 16
MESHES = {"1x8": (1, 8), "2x4": (2, 4), "8x1": (8, 1)}
# The method sweep runs on the tiny random Llama (2 layers: each case compiles its own
# sharded programs, the cost of this module), with ragged token-id rows. Its greedy choices
# are clear (top-two logit gaps >= 4.7e-4, sharding moves logits by ~1e-6).
ROWS = [[5, 17, 33, 2, 90, 41, 7], [9, 9, 9, 12], list(range(60, 76)), [3], [100, 101, 7, 7, 50, 51]]
METHODS = {
    "ar": lambda draft, medusa, eagle: None,
    "draft": lambda draft, medusa, eagle: jaxdec.spec.DraftModel(draft, num_tokens=3),
    "tree": lambda draft, medusa, eagle: jaxdec.spec.DraftTree(draft, depth=3, top_k=2, max_nodes=6),
    "static_tree": lambda draft, medusa, eagle: jaxdec.spec.StaticTree(draft, [(0,), (1,), (0, 0), (0, 0, 0)]),
    "medusa": lambda draft, medusa, eagle: jaxdec.spec.Medusa(medusa, [(0,), (1,), (0, 0)]),
    "eagle": lambda draft, medusa, eagle: jaxdec.spec.Eagle(eagle, depth=3, top_k=2, max_nodes=6),
    "layerskip": lambda draft, medusa, eagle: jaxdec.spec.LayerSkip([1], num_tokens=3),
    "lookup": lambda draft, medusa, eagle: jaxdec.spec.PromptLookup(num_tokens=4, num_candidates=2),
    "sparse": lambda draft, medusa, eagle: jaxdec.spec.SparseSelf(budget=12, num_tokens=3, page_size=4),
}
# Every method on the mixed mesh; a chain, a tree or heads on the two one-axis meshes.
CASES = ([("2x4", m) for m in METHODS] + [("1x8", m) for m in ("ar", "draft", "eagle")]
         + [("8x1", m) for m in ("ar", "tree", "lookup")])


@pytest.fixture(scope="module")
def reference():
    """Plain greedy decoding on one device: the demo target's text rows, the tiny Llama's ids."""
    target = jaxdec.load("demo-target")
    return {"batch": jaxdec.generate(target, PROMPTS, max_new_tokens=MAX_NEW).tokens,
            "single": jaxdec.generate(target, PROMPTS[:1], max_new_tokens=MAX_NEW).tokens}


@pytest.fixture(scope="module")
def tiny(llama):
    """The tiny Llama, a noisy copy of it as the draft (it agrees often, not always), random
    Medusa and EAGLE heads, and its plain greedy output on ROWS."""
    from tests.test_heads import random_heads
    rng = np.random.default_rng(0)
    noisy = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + 0.1 * np.std(np.asarray(x)) * rng.standard_normal(x.shape).astype(np.float32),
        llama.params)
    return {"target": llama, "draft": model_from_params(llama.config, noisy),
            "medusa": random_heads(llama, "medusa", num_heads=2), "eagle": random_heads(llama, "eagle"),
            "plain": jaxdec.generate(llama, ROWS, max_new_tokens=MAX_NEW, stop_token_ids=[]).tokens}


@pytest.fixture(scope="module")
def on_mesh(tiny):
    """mesh name -> (target, draft, medusa heads, eagle heads) of the tiny set on that mesh."""
    loaded = {}

    def get(name):
        if name not in loaded:
            mesh = jaxdec.make_mesh(*MESHES[name])
            loaded[name] = (on_mesh_(tiny["target"], mesh), on_mesh_(tiny["draft"], mesh),
                            heads_on_mesh(tiny["medusa"], mesh), heads_on_mesh(tiny["eagle"], mesh))
        return loaded[name]
    return get


@pytest.mark.parametrize("mesh, method", CASES)
def test_greedy_on_a_mesh_equals_one_device(on_mesh, tiny, mesh, method):
    target, draft, medusa, eagle = on_mesh(mesh)
    out = jaxdec.generate(target, ROWS, max_new_tokens=MAX_NEW, stop_token_ids=[],
                          speculative=METHODS[method](draft, medusa, eagle))
    assert out.tokens == tiny["plain"]


def test_qwen3_on_a_mesh_equals_one_device(models):
    """Qwen3's per-head query/key norms with the heads split over the model axis (its norm
    scales replicated), verifying a tree."""
    target = models["qwen3"]
    plain = jaxdec.generate(target, ROWS, max_new_tokens=MAX_NEW, stop_token_ids=[]).tokens
    sharded = on_mesh_(target, jaxdec.make_mesh(data=2, model=4))
    assert sharded.params["layers_0"]["self_attn"]["q_norm"]["scale"].sharding.is_fully_replicated
    method = jaxdec.spec.DraftTree(sharded, depth=3, top_k=2, max_nodes=6)
    assert jaxdec.generate(sharded, ROWS, max_new_tokens=MAX_NEW, stop_token_ids=[], speculative=method).tokens == plain


def test_steady_state_on_a_mesh_compiles_nothing(on_mesh):
    from tests.test_steps import compilations
    target, draft, _, _ = on_mesh("2x4")
    method = jaxdec.spec.DraftModel(draft, num_tokens=3)
    jaxdec.generate(target, ROWS, max_new_tokens=MAX_NEW, speculative=method)
    jaxdec.generate(target, ROWS, max_new_tokens=MAX_NEW)
    with compilations() as steady:  # same buckets; other prompts, sampling and seed
        jaxdec.generate(target, ROWS[::-1], max_new_tokens=MAX_NEW - 4, temperature=0.7, seed=5, speculative=method)
        jaxdec.generate(target, ROWS[1:] + ROWS[:1], max_new_tokens=MAX_NEW, temperature=1.0, top_k=20)
    assert steady == [], [n for e, n in steady if "backend" in e]


def test_one_row_on_eight_data_devices(reference):
    """A batch of one does not divide the data axis: the row is replicated, same answer."""
    mesh = jaxdec.make_mesh(data=8, model=1)
    target = jaxdec.load("demo-target", mesh=mesh)
    assert jaxdec.generate(target, PROMPTS[:1], max_new_tokens=MAX_NEW).tokens == reference["single"]


def test_logits_on_a_mesh_match_one_device():
    ids = jaxdec.load("demo-target").tokenizer.encode(PROMPTS[1]).ids
    one = jaxdec.logits(jaxdec.load("demo-target"), ids)
    sharded = jaxdec.logits(jaxdec.load("demo-target", mesh=jaxdec.make_mesh(data=2, model=4)), ids)
    np.testing.assert_allclose(sharded, one, atol=2e-4, rtol=1e-4)
    # jax.make_mesh's axes are Explicit: load took such a mesh and the first step failed deep
    # in JAX (a gather asking for its out_sharding). Placed on it as on jaxdec.make_mesh's.
    explicit = jax.make_mesh((2, 4), sharding.AXES, axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    target = jaxdec.load("demo-target", mesh=explicit)
    assert target.config.mesh == jaxdec.make_mesh(data=2, model=4)
    np.testing.assert_allclose(jaxdec.logits(target, ids), one, atol=2e-4, rtol=1e-4)


def _shard_shape(x):
    return x.addressable_shards[0].data.shape


def test_params_are_split_where_the_shapes_divide():
    """The demo target: 6 heads, 2 kv heads of 64, MLP 1024, vocabulary 4096, hidden 384."""
    wide = jaxdec.load("demo-target", mesh=jaxdec.make_mesh(data=4, model=2)).params
    layer = wide["layers_0"]
    assert _shard_shape(layer["self_attn"]["q_proj"]["kernel"]) == (384, 192)   # 3 heads per device
    assert _shard_shape(layer["self_attn"]["k_proj"]["kernel"]) == (384, 64)    # 1 kv head per device
    assert _shard_shape(layer["self_attn"]["o_proj"]["kernel"]) == (192, 384)
    assert _shard_shape(layer["mlp"]["down_proj"]["kernel"]) == (512, 384)
    assert _shard_shape(wide["lm_head"]["kernel"]) == (384, 2048)
    assert _shard_shape(wide["embed_tokens"]["embedding"]) == (2048, 384)
    assert _shard_shape(layer["input_layernorm"]["scale"]) == (384,)

    narrow = jaxdec.load("demo-target", mesh=jaxdec.make_mesh(data=1, model=8)).params["layers_0"]
    # 6 heads and 2 kv heads do not divide 8 devices: replicated, never split inside a head.
    assert narrow["self_attn"]["q_proj"]["kernel"].sharding.spec == P(None, None)
    assert _shard_shape(narrow["self_attn"]["k_proj"]["kernel"]) == (384, 128)
    assert _shard_shape(narrow["mlp"]["gate_proj"]["kernel"]) == (384, 128)


def test_rules_replicate_what_does_not_divide():
    mesh = jaxdec.make_mesh(data=2, model=4)
    rules = sharding.RULES
    assert rules.spec(mesh, [("batch", 8), ("kv_heads", 8), (None, 1)]) == P("data", "model", None)
    assert rules.spec(mesh, [("batch", 3), ("kv_heads", 2), (None, 1)]) == P(None, None, None)
    assert rules.spec(mesh, [("heads", 8), ("mlp", 8)]) == P("model", None)  # one mesh axis per array
    assert sharding.ShardingRules(vocab=None).spec(mesh, [("vocab", 4096)]) == P(None)


def test_a_bias_is_split_like_its_kernels_output():
    """Qwen2's q/k/v biases (and Llama's optional o bias) shard with their kernel's output
    axis: by whole heads where the heads divide the axis, else replicated."""
    mesh = jaxdec.make_mesh(data=4, model=2)
    spec = lambda name, size: sharding.param_spec(mesh, ("layers_0", "self_attn", name, "bias"), (size,), 64)
    assert spec("q_proj", 6 * 64) == P("model")
    assert spec("k_proj", 2 * 64) == P("model")
    assert spec("v_proj", 3 * 64) == P(None)          # 3 kv heads on 2 devices: never split inside a head
    assert spec("o_proj", 384) == P(None)             # the hidden axis is replicated


def test_cache_stays_sharded_and_donated_through_prefill_and_decode():
    mesh = jaxdec.make_mesh(data=4, model=2)
    target = jaxdec.load("demo-target", mesh=mesh)
    cfg, B, S = target.config, 4, 64
    cache = init_cache(cfg, B, S, target.dtype)
    sharded = NamedSharding(mesh, P("data", "model", None, None))
    assert cache.k[0].sharding.is_equivalent_to(sharded, 4)
    assert _shard_shape(cache.k[0]) == (1, 1, S, 64)
    tokens = np.zeros((B, S), np.int32)
    tokens[:, :3] = [[1, 5, 9], [1, 7, 7], [1, 2, 3], [1, 4, 4]]
    inputs = sharding.put_batch(mesh, tokens, np.full((B,), 3, np.int32), np.ones((B,), bool))
    keys = jax.random.wrap_key_data(sharding.put_batch(mesh, jax.random.key_data(row_keys(0, B)))[0])
    stop = np.full((16,), -1, np.int32)
    donated = jax.tree_util.tree_leaves(cache)
    state, cache = steps.prefill(cfg, target.params, cache, *inputs, SamplingParams.create(), keys, stop,
                                 np.int32(8), prompt_bucket=16)
    assert all(x.is_deleted() for x in donated)
    donated = jax.tree_util.tree_leaves(cache)
    state, cache = steps.decode(cfg, target.params, cache, state, SamplingParams.create(), stop, np.int32(8))
    assert all(x.is_deleted() for x in donated)
    for layer in cache.k + cache.v:
        assert layer.sharding.is_equivalent_to(sharded, 4)


def test_pallas_kernel_runs_under_shard_map(reference):
    """Kv heads split over "model" (4x2): each device's kernel sees its own rows and heads."""
    mesh = jaxdec.make_mesh(data=4, model=2)
    target = jaxdec.load("demo-target", mesh=mesh, attn_impl="pallas")
    draft = jaxdec.load("demo-draft", mesh=mesh, attn_impl="pallas")
    method = jaxdec.spec.DraftTree(draft, depth=3, top_k=2, max_nodes=6)  # plain steps and tree verifies
    out = jaxdec.generate(target, PROMPTS, max_new_tokens=6, speculative=method).tokens
    assert out == [row[:6] for row in reference["batch"]]


def test_mesh_errors():
    with pytest.raises(ValueError, match="data=3 x model=3 needs 9 devices, but 8 are available"):
        jaxdec.make_mesh(data=3, model=3)
    with pytest.raises(ValueError, match="data=1 x model=2 needs 2 devices, but 1 is given"):
        jaxdec.make_mesh(model=2, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="model must be an integer"):
        jaxdec.make_mesh(data=8, model=0)
    # A device twice made a mesh that failed in XLA at the first step; the others, an
    # AttributeError or TypeError that named nothing.
    d = jax.devices()[0]
    with pytest.raises(ValueError, match="make_mesh: devices lists device .*0 more than once"):
        jaxdec.make_mesh(data=2, devices=[d, d])
    with pytest.raises(ValueError, match="mesh lists device .*0 more than once"):
        jaxdec.load("demo-draft", mesh=jax.sharding.Mesh(np.asarray([d, d], dtype=object).reshape(2, 1), sharding.AXES))
    for bad in ("ab", 5, [None]):
        with pytest.raises(ValueError, match=r"make_mesh: devices must be .*JAX devices .*got ('ab'|5|None)"):
            jaxdec.make_mesh(devices=bad)
    for text in ("data=2,pipe=4", "model=8,model=1", "", " , "):  # a repeated axis ran with its last size
        with pytest.raises(ValueError, match=f"mesh {re.escape(repr(text))}: expected data=N,model=M"):
            sharding.parse_mesh(text)
    assert sharding.parse_mesh("data=2, model=4,") == (2, 4)
    assert sharding.parse_mesh("model=8") == (1, 8)
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
        jaxdec.load("demo-target", mesh="1x8")
    other = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("x", "y"))
    with pytest.raises(ValueError, match="mesh axes must be"):
        jaxdec.load("demo-target", mesh=other)
    target = jaxdec.load("demo-target", mesh=jaxdec.make_mesh(data=2, model=4))
    with pytest.raises(ValueError, match="the draft model's parameters are on one device but the target is on mesh"):
        jaxdec.generate(target, PROMPTS, max_new_tokens=4, speculative=jaxdec.spec.DraftModel(jaxdec.load("demo-draft")))
    with pytest.raises(ValueError, match="the eagle heads are on one device"):
        jaxdec.generate(target, PROMPTS, max_new_tokens=4, speculative=jaxdec.spec.Eagle(jaxdec.load_heads("demo-eagle")))
    # Same shape, other devices: the message told two identical-looking meshes apart by nothing.
    elsewhere = jaxdec.make_mesh(data=2, model=4, devices=jax.devices()[::-1])
    with pytest.raises(ValueError, match=r"eagle heads are on mesh \{'data': 2, 'model': 4\} of devices \[7, 6, 5, 4, 3, 2, 1, 0\] "
                                         r"but the target is on mesh \{'data': 2, 'model': 4\} of devices \[0, 1, 2, 3, 4, 5, 6, 7\]"):
        jaxdec.generate(target, PROMPTS, max_new_tokens=4,
                        speculative=jaxdec.spec.Eagle(jaxdec.load_heads("demo-eagle", mesh=elsewhere)))


def test_spare_device_mesh_takes_a_device_the_target_leaves_free():
    devices = jax.devices()
    assert list(sharding.spare_device_mesh(None).devices.flat) == [devices[1]]
    assert list(sharding.spare_device_mesh(jaxdec.make_mesh(model=4)).devices.flat) == [devices[4]]
    # Every device taken: the last one, shared (Pearl then runs without the overlap).
    assert list(sharding.spare_device_mesh(jaxdec.make_mesh(data=2, model=4)).devices.flat) == [devices[-1]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes_run(*argv):
    """[(exit status, stdout, stderr)] of `python *argv` in two CPU processes of 4 devices each,
    one program over jax.distributed (gloo collectives)."""
    port, root = _free_port(), Path(__file__).resolve().parent.parent
    # The suite's XLA flags (conftest: compile time is the test's time) but four devices each.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4".strip(),
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", PYTHONPATH=str(root))
    command = [sys.executable, *argv]
    procs = [subprocess.Popen(command, env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=root) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:  # a hung process (one waiting for the other at a barrier) fails the test, not the run
        for p in procs:
            p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def _two_processes_run_the_cli(*args):
    return _two_processes_run("-m", "jaxdec.cli", "generate", PROMPTS[0], *args)


def test_two_processes_run_the_cli_as_one_program(reference):
    """The documented multi-host command, on a 2x4 mesh spanning both processes, prints plain
    decoding's text."""
    runs = _two_processes_run_the_cli("--method", "draft", "--mesh", "data=2,model=4", "--max-new-tokens", str(MAX_NEW))
    outs = [(out, err) for _, out, err in runs]
    assert [code for code, _, _ in runs] == [0, 0], [err[-2000:] for _, err in outs]
    text = jaxdec.load("demo-target").tokenizer.decode(reference["single"][0], skip_special_tokens=True)
    assert PROMPTS[0] + text in outs[0][0]
    assert "[draft]" in outs[0][1] and "[draft]" not in outs[1][1]  # process 0 speaks for both


def test_two_processes_run_the_decode_benchmark_as_one_program(tmp_path):
    """The documented multi-host benchmark: process 0 alone prints and writes the results, and
    the machine says how many processes ran it (plain decoding only: the CLI's two-process test
    shows a method's tokens across processes equal one device's)."""
    results = tmp_path / "two_processes.json"
    runs = _two_processes_run("benchmarks/decode.py", "--methods", "ar", "--mesh", "data=2,model=4",
                              "--max-new-tokens", "4", "--num-prompts", "1", "--repeats", "1", "--no-progress",
                              "--out", str(results))
    assert [code for code, _, _ in runs] == [0, 0], [err[-2000:] for _, _, err in runs]
    (_, out0, _), (_, out1, _) = runs
    assert f"wrote {results}" in out0 and "tok/s" in out0
    assert "wrote" not in out1 and "tok/s" not in out1
    written = json.loads(results.read_text())
    assert written["machine"]["processes"] == 2 and len(written["machine"]["devices"]) == 8
    assert [(m["method"], m["mesh"], m["new_tokens"]) for m in written["methods"]] == [("ar", "data=2,model=4", 4)]


@pytest.mark.parametrize("args, error", [
    # Process 1 would hold no part of the target (it failed deep in make_array_from_callback,
    # and process 0 then in orbax's read, waiting for it).
    (("--method", "ar", "--mesh", "data=2,model=2"),
     "mesh data=2 x model=2 holds devices of process 0 only; in a multi-process run it must span all 2 processes "
     "(jax.devices() lists 8)"),
    # Pearl's draft would go on a device of its choosing, perhaps the other process's.
    (("--method", "pearl", "--mesh", "data=2,model=4"),
     "spec.Pearl runs in one process, but this is process {index} of 2 (jax.distributed); across hosts use "
     "spec.DraftModel")], ids=["mesh_without_a_process", "pearl"])
def test_what_two_processes_cannot_run_is_refused_in_one_line(args, error):
    runs = _two_processes_run_the_cli(*args, "--max-new-tokens", "4")
    for index, (code, out, err) in enumerate(runs):
        assert code == 2 and PROMPTS[0] not in out, err[-2000:]  # nothing decoded
        assert "jaxdec: error: " + error.format(index=index) + "\n" in err


def test_chunked_prefill_on_a_mesh_equals_one_device(on_mesh, tiny, small_prefill_chunks):
    """Prompts read 4 tokens at a time (a lax.fori_loop over chunks) by the sharded target and
    draft: the cache stays sharded and donated (an unusable donation is an error here)."""
    target, draft, _, _ = on_mesh("2x4")
    out = jaxdec.generate(target, ROWS, max_new_tokens=MAX_NEW, stop_token_ids=[],
                          speculative=jaxdec.spec.DraftModel(draft, num_tokens=3))
    assert out.tokens == tiny["plain"]
