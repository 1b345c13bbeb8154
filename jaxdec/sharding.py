"""Placing models, caches and batches on a device mesh.

One `Mesh` with axes ("data", "model"). A small table (`ShardingRules`) maps the logical axes
of every array to mesh axes: the batch over "data"; attention heads, kv heads, MLP channels
and the vocabulary over "model"; everything else replicated. A logical axis whose size does
not divide its mesh axis (two kv heads on four "model" devices, a batch of one on eight
"data" devices) is replicated instead, so every shape runs on every mesh and gives the same
outputs as one device. Heads are never split inside a head: they shard only when their
count divides the axis.

A model's mesh travels in its config (`ModelConfig.mesh`, a static argument of every step),
so a draft model can live on its own mesh, and the step functions pin the cache to its
sharding (`constrain`), which keeps the donated cache buffers usable in place.

Multi-host: every process runs the same program; `initialize_distributed` starts
`jax.distributed` when the environment asks for it, `put` builds a global array from the
same host value on every process, and `to_host` reads a global array back on every process.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdec.checks import is_int

AXES = ("data", "model")


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A `jax.sharding.Mesh` of data x model devices with axes ("data", "model").

    devices: the devices to use, exactly data * model of them (default: the first data * model
    of jax.devices(), over every process).
    """
    for name, n in (("data", data), ("model", model)):
        if not is_int(n) or n < 1:
            raise ValueError(f"make_mesh: {name} must be an integer >= 1, got {n!r}")
    where = "available" if devices is None else "given"
    if devices is None:
        devices = jax.devices()[:data * model]
    elif isinstance(devices, (str, bytes)) or not isinstance(devices, Iterable):
        raise ValueError(f"make_mesh: devices must be a list of JAX devices (jax.devices()), got {devices!r:.60}")
    devices = list(devices)
    for device in devices:
        if not isinstance(device, jax.Device):
            raise ValueError(f"make_mesh: devices must be JAX devices (jax.devices()), got {device!r:.60}")
    check_distinct(devices, "make_mesh: devices")
    if data * model != len(devices):
        verb = "is" if len(devices) == 1 else "are"
        raise ValueError(f"make_mesh: data={data} x model={model} needs {data * model} "
                         f"device{'s' * (data * model > 1)}, but {len(devices)} {verb} {where} "
                         f"({devices[0].platform if devices else 'none'}); "
                         f"on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N gives N devices")
    return Mesh(np.asarray(devices, dtype=object).reshape(data, model), AXES)


def check_distinct(devices: list, what: str) -> None:
    """ValueError for a device listed twice: jax.sharding.Mesh takes one, and placing arrays on
    such a mesh fails only later, inside XLA."""
    seen = set()
    twice = next((d for d in devices if d in seen or seen.add(d)), None)
    if twice is not None:
        raise ValueError(f"{what} lists device {twice} more than once: each device holds one part of the mesh")


def check_one_process(what: str) -> None:
    """ValueError in a multi-process run (jax.distributed): `what` puts a model on a device of
    its choosing, which may be one that another process holds."""
    if jax.process_count() > 1:
        raise ValueError(f"{what} runs in one process, but this is process {jax.process_index()} of "
                         f"{jax.process_count()} (jax.distributed); across hosts use spec.DraftModel")


def spare_device_mesh(mesh: Mesh | None) -> Mesh:
    """A one-device mesh for `spec.Pearl`'s draft: the first device that `mesh` (None: the
    default device) leaves free, so the draft runs while the target verifies; the last device
    when none is free (then the draft shares it and the rounds run without the overlap).
    One process only (`check_one_process`)."""
    check_one_process("spec.Pearl")
    used = set(mesh.devices.flat) if mesh is not None else {jax.devices()[0]}
    spare = [d for d in jax.devices() if d not in used] or jax.devices()[-1:]
    return make_mesh(devices=spare[:1])


def parse_mesh(text: str) -> tuple[int, int]:
    """"data=2,model=4" -> (2, 4) (a missing axis is 1); ValueError naming the text otherwise."""
    sizes = {}
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, value = (s.strip() for s in part.split("="))
            if name not in AXES or name in sizes:  # (a repeated axis: which size was meant?)
                raise ValueError(name)
            sizes[name] = int(value)
        if not sizes:
            raise ValueError(text)
    except ValueError:
        raise ValueError(f"mesh {text!r}: expected data=N,model=M (each axis at most once)") from None
    return sizes.get("data", 1), sizes.get("model", 1)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (None: replicated)."""
    batch: str | None = "data"
    heads: str | None = "model"
    kv_heads: str | None = "model"
    mlp: str | None = "model"
    vocab: str | None = "model"

    def spec(self, mesh: Mesh, axes) -> P:
        """The PartitionSpec of an array whose dimensions have the logical `axes`: pairs
        (logical name or None, count of units along it). A name maps to its mesh axis only
        where the count divides that axis's size, and each mesh axis is used once."""
        used, out = set(), []
        for name, count in axes:
            mesh_axis = getattr(self, name) if name else None
            if mesh_axis is None or mesh_axis in used or count % mesh.shape[mesh_axis]:
                out.append(None)
            else:
                used.add(mesh_axis)
                out.append(mesh_axis)
        return P(*out)


RULES = ShardingRules()

# Parameter name -> logical axes of its kernel ([in, out]); a bias takes the out axis.
_KERNEL_AXES = {
    "q_proj": (None, "heads"), "k_proj": (None, "kv_heads"), "v_proj": (None, "kv_heads"),
    "o_proj": ("heads", None), "gate_proj": (None, "mlp"), "up_proj": (None, "mlp"),
    "down_proj": ("mlp", None), "lm_head": (None, "vocab"),
}


def param_spec(mesh: Mesh, path: tuple[str, ...], shape: tuple[int, ...], head_dim: int,
               rules: ShardingRules = RULES) -> P:
    """The PartitionSpec of one parameter, from its path in the tree (see jaxdec.model).
    Unknown parameters (norm scales, a drafter's own small layers) are replicated."""
    owner, leaf = (path[-2] if len(path) > 1 else ""), path[-1]
    units = lambda name, size: size // head_dim if name in ("heads", "kv_heads") else size
    if owner == "embed_tokens" and len(shape) == 2:  # [V, D]
        logical = ("vocab", None)
    elif owner in _KERNEL_AXES and leaf == "kernel" and len(shape) == 2:
        logical = _KERNEL_AXES[owner]
    elif owner in _KERNEL_AXES and leaf == "bias" and len(shape) == 1:
        logical = _KERNEL_AXES[owner][1:]
    else:
        logical = (None,) * len(shape)
    return rules.spec(mesh, [(name, units(name, size)) for name, size in zip(logical, shape)])


def param_shardings(mesh: Mesh, params, head_dim: int, rules: ShardingRules = RULES):
    """A pytree of NamedShardings matching `params`."""
    def one(path, x):
        keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return NamedSharding(mesh, param_spec(mesh, keys, tuple(x.shape), head_dim, rules))
    return jax.tree_util.tree_map_with_path(one, params)


def place_params(mesh: Mesh, params, head_dim: int, rules: ShardingRules = RULES):
    """The parameters laid out on the mesh (each process passes the same host values)."""
    shardings = param_shardings(mesh, params, head_dim, rules)
    return jax.tree_util.tree_map(lambda x, s: put(np.asarray(x), s), params, shardings)


def cache_spec(cfg, batch_size: int, rules: ShardingRules = RULES) -> P:
    """[batch, kv_heads, slots, head_dim]: rows over data, kv heads over model."""
    return rules.spec(cfg.mesh, [("batch", batch_size), ("kv_heads", cfg.num_key_value_heads), (None, 1), (None, 1)])


def batch_spec(mesh: Mesh, batch_size: int, ndim: int, rules: ShardingRules = RULES) -> P:
    """An array whose first axis is the batch, the rest replicated."""
    return rules.spec(mesh, [("batch", batch_size)] + [(None, 1)] * (ndim - 1))


def constrain(cfg, x, spec: P):
    """x pinned to `spec` on the config's mesh inside a jitted step (a no-op without a mesh)."""
    if cfg.mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(cfg.mesh, spec))


def constrain_cache(cfg, cache):
    """Every layer of the KV cache pinned to its sharding (a no-op without a mesh)."""
    if cfg.mesh is None:
        return cache
    spec = cache_spec(cfg, cache.batch_size)
    pin = lambda layers: tuple(None if x is None else constrain(cfg, x, spec) for x in layers)
    return cache.replace(k=pin(cache.k), v=pin(cache.v), lengths=constrain(cfg, cache.lengths, P(spec[0])))


def attention_over_mesh(cfg, kernel, q, k_cache, v_cache, lengths, k_new, v_new, step_mask, *per_kv_head):
    """An attention kernel (pallas_kernels) run per shard under shard_map: each device attends
    its own rows and kv heads (with their query heads), which is all attention ever needs, so
    no data moves. `per_kv_head`: more arguments [B, Hkv, ...] (a sparse kernel's page ids),
    passed last. Without a mesh the kernel runs as it is."""
    if cfg.mesh is None:
        return kernel(q, k_cache, v_cache, lengths, k_new, v_new, step_mask, *per_kv_head)
    cache = cache_spec(cfg, q.shape[0])
    rows, kv_heads = cache[0], cache[1]
    heads = P(rows, None, kv_heads, None)  # q [B, T, H, D] and the step's k, v [B, T, Hkv, D]
    extra = tuple(P(rows, kv_heads, *(None,) * (x.ndim - 2)) for x in per_kv_head)
    # Query heads shard with their kv heads: H = G * Hkv, so contiguous chunks stay aligned.
    sharded = jax.shard_map(kernel, mesh=cfg.mesh, out_specs=heads, check_vma=False,
                            in_specs=(heads, cache, cache, P(rows), heads, heads, P(rows, None, None), *extra))
    return sharded(q, k_cache, v_cache, lengths, k_new, v_new, step_mask, *per_kv_head)


def put(value, sharding: NamedSharding):
    """A global array with the given sharding from a host value that every process holds."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def put_batch(mesh: Mesh | None, *values):
    """Host arrays whose first axis is the batch, placed on the mesh (unchanged without one)."""
    if mesh is None:
        return values
    return tuple(put(v, NamedSharding(mesh, batch_spec(mesh, np.shape(v)[0], np.ndim(v)))) for v in values)


def put_replicated(mesh: Mesh, tree):
    """Every leaf of a pytree of host values placed whole on every device of the mesh."""
    everywhere = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(lambda v: put(v, everywhere), tree)


def to_host(x) -> np.ndarray:
    """A (possibly global, multi-process) array read back in full on this process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# Environment variables that ask for a multi-process run (jax.distributed reads them, or
# detects a cluster: SLURM, Open MPI, a Cloud TPU pod slice).
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAXDEC_DISTRIBUTED")


def initialize_distributed() -> bool:
    """Starts jax.distributed when the environment asks for it; True if it did.

    JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID) gives the cluster
    explicitly; JAXDEC_DISTRIBUTED=1 lets JAX detect it (SLURM, Open MPI, TPU pod slices).
    Call it before anything touches the devices; calling it twice is harmless.
    """
    if not any(os.environ.get(name) for name in DISTRIBUTED_ENV):
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # CPU processes exchange data through gloo (the default does not cross processes).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True
