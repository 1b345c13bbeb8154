"""Trains the shipped demo checkpoints (`demo-target`, `demo-draft`) on CPU.

    python -m jaxdec.train tokenizer --workdir W
    python -m jaxdec.train target --workdir W --out checkpoints/demo-target
    python -m jaxdec.train draft  --workdir W --teacher checkpoints/demo-target --out checkpoints/demo-draft
    python -m jaxdec.train medusa --workdir W --teacher checkpoints/demo-target --out checkpoints/demo-medusa
    python -m jaxdec.train eagle  --workdir W --teacher checkpoints/demo-target --out checkpoints/demo-eagle
(the draft heads: `jaxdec/train_heads.py`)

Corpus and tokenizer: the standard library's Python source with a fixed held-out split and
a byte-level BPE tokenizer (`jaxdec/corpus.py`).

Target: next-token cross-entropy with AdamW and a warmup + cosine schedule. Draft: distilled
from the frozen target, loss KL(target || draft) of the next-token distributions (teacher
logits computed in the same jitted step), optionally plus `--ce-weight` x cross-entropy.
Both use `jaxdec.model.sequence_logits`, the decoder every other path uses. A draft can then
be fine-tuned on the target's own continuations (`--init D --on-policy N`, greedy, or sampled
with `--on-policy-temperature T`; see `jaxdec/on_policy.py`), which is what decoding asks it
to predict:

    python -m jaxdec.train draft --workdir W --teacher demo-target --init demo-draft \
        --on-policy 4096 --run draft-on-policy --steps 600 --batch-size 16 --seq-len 256 --lr 1e-3 --warmup 20

Everything lives in the work folder: `tokenizer.json`, the tokenized corpus, and per run
(`W/target`, `W/draft`) orbax checkpoints of (params, optimizer state, step) every
`--save-every` steps. Rerunning the same command resumes from the latest one; a finished
run only re-evaluates and re-exports. The export (`--out`) is a `jaxdec.load`-able folder:
`jaxdec.storage.save` + `tokenizer.json` + `generation_config.json` + `training.json` (the
configs, FLOPs per token, steps, wall time and held-out metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from jaxdec import storage
from jaxdec.cli import COUNT, FOLDER, POSITIVE, RATE, WEIGHT
from jaxdec.config import ModelConfig
from jaxdec.corpus import BOS_ID, DEFAULT_VOCAB_SIZE, EOS_ID, batch_at, eval_windows, prepare
from jaxdec.loading import _resolve, read_tokenizer
from jaxdec.model import init_params, sequence_logits
from jaxdec.sampling import SamplingParams

PROBE_WINDOWS, PROBE_LEN = 4, 256  # the small held-out sample recorded with each export

TARGET_CONFIG = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                     num_attention_heads=6, num_key_value_heads=2, head_dim=64)
DRAFT_CONFIG = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def _log(message: str) -> None:
    print(message, flush=True)  # flushed: runs are usually followed through a log file


# --------------------------------------------------------------------------- models

def make_config(vocab_size: int, **sizes) -> ModelConfig:
    return ModelConfig(model_type="llama", max_position_embeddings=4096, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=BOS_ID,
                       eos_token_id=(EOS_ID,), vocab_size=vocab_size, **sizes)


def param_counts(cfg: ModelConfig) -> dict:
    """Parameter counts and the FLOPs-per-token estimate 2 x (non-embedding + LM-head params)."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    total = int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))
    embed = cfg.vocab_size * cfg.hidden_size
    head = cfg.vocab_size * cfg.hidden_size  # the head matmul costs this even when tied
    non_embedding = total - embed - (0 if cfg.tie_word_embeddings else head)
    return {"total_params": total, "non_embedding_params": non_embedding, "lm_head_params": head,
            "flops_per_token": 2 * (non_embedding + head)}


def flops_per_token(cfg: ModelConfig) -> int:
    return param_counts(cfg)["flops_per_token"]


# --------------------------------------------------------------------------- losses and steps

def _next_token_nll(logits, targets):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def loss_fn(cfg, params, batch, teacher_cfg=None, teacher_params=None, ce_weight: float = 0.0):
    """(loss, metrics). Without a teacher: mean next-token cross-entropy. With one: mean
    KL(teacher || model) of the next-token distributions (+ ce_weight x cross-entropy)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = sequence_logits(cfg, params, inputs)
    ce = _next_token_nll(logits, targets).mean()
    if teacher_cfg is None:
        return ce, {"ce": ce}
    t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(sequence_logits(teacher_cfg, teacher_params, inputs)))
    logp = jax.nn.log_softmax(logits)
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - logp), axis=-1).mean()
    return kl + ce_weight * ce, {"ce": ce, "kl": kl}


def make_optimizer(lr: float, steps: int, warmup: int, weight_decay: float, min_lr_ratio: float = 0.1,
                   clip: float = 1.0):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1),
                                                  end_value=lr * min_lr_ratio)
    decay_mask = lambda params: jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)  # no decay on norms
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=decay_mask)), schedule


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """What a run trains: a decoder (`cfg`), on cross-entropy or distilled from a teacher.
    The draft heads of `jaxdec.train_heads` are the other objectives; each has `init(rng)`,
    `loss(params, batch, teacher_params) -> (loss, metrics)` and `describe()` (a JSON dict)."""
    cfg: ModelConfig
    teacher_cfg: ModelConfig | None = None
    ce_weight: float = 0.0

    def init(self, rng):
        return init_params(self.cfg, rng)

    def loss(self, params, batch, teacher_params):
        return loss_fn(self.cfg, params, batch, self.teacher_cfg, teacher_params, self.ce_weight)

    def describe(self) -> dict:
        return self.cfg.to_dict()


@functools.lru_cache(maxsize=8)
def _compiled_step(objective, lr: float, steps: int, warmup: int, weight_decay: float):
    """(optimizer, schedule, jitted step), shared by runs with the same settings (resuming in
    one process compiles nothing new)."""
    optimizer, schedule = make_optimizer(lr, steps, warmup, weight_decay)
    return optimizer, schedule, make_train_step(objective, optimizer)


def make_train_step(objective, optimizer):
    def step(params, opt_state, batch, teacher_params):
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: objective.loss(p, batch, teacher_params), has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(cfg, teacher_cfg=None):
    """Per-window sums over positions: nll, and with a teacher the argmax agreements, the
    teacher's nll, KL(teacher || model) and sum_x min(p_teacher, p_model) (the expected
    acceptance of one drafted token at temperature 1). Only the predictions of tokens
    `first + 1`.. count (`first`: a window's prompt, whose tokens were not generated)."""
    def step(params, batch, teacher_params, first=0):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        counted = jnp.arange(inputs.shape[1]) >= first
        total = lambda per_position: jnp.where(counted, per_position, 0).sum(axis=1)
        logits = sequence_logits(cfg, params, inputs)
        out = {"nll": total(_next_token_nll(logits, targets))}
        if teacher_cfg is not None:
            t_logits = sequence_logits(teacher_cfg, teacher_params, inputs)
            t_logp, logp = jax.nn.log_softmax(t_logits), jax.nn.log_softmax(logits)
            out["agree"] = total(jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1))
            out["teacher_nll"] = total(_next_token_nll(t_logits, targets))
            out["kl"] = total(jnp.sum(jnp.exp(t_logp) * (t_logp - logp), axis=-1))
            out["accept_t1"] = total(jnp.minimum(jnp.exp(t_logp), jnp.exp(logp)).sum(axis=-1))
        return out
    return jax.jit(step)


def _uncommitted(tree):
    """The arrays as uncommitted device arrays, like a jitted step's outputs: restored or loaded
    ones are committed, and jit compiles separately for committed and uncommitted inputs."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), tree)


def evaluate(eval_step, params, windows: np.ndarray, batch_size: int, teacher_params=None, first: int = 0) -> dict:
    """Means per token over `windows` [n, T+1] (last batch padded with repeats, weighted out),
    counting the predictions of tokens first + 1.. only."""
    n, T = windows.shape[0], windows.shape[1] - 1 - first
    params, teacher_params = _uncommitted(params), _uncommitted(teacher_params)
    sums: dict[str, float] = {}
    for start in range(0, n, batch_size):
        chunk = windows[start:start + batch_size]
        real = chunk.shape[0]
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real, axis=0)])
        out = jax.device_get(eval_step(params, jnp.asarray(chunk), teacher_params, first))
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(np.asarray(value, np.float64)[:real].sum())
    count = n * T
    result = {"tokens": count, "loss": sums["nll"] / count}
    if "agree" in sums:
        result.update(greedy_agreement=sums["agree"] / count, teacher_loss=sums["teacher_nll"] / count,
                      kl=sums["kl"] / count, expected_acceptance_t1=sums["accept_t1"] / count)
    return result


# --------------------------------------------------------------------------- runs

@dataclasses.dataclass
class RunOptions:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    weight_decay: float = 0.1
    save_every: int = 100
    log_every: int = 25
    seed: int = 0
    eval_windows: int = 128     # held-out windows for the final evaluation
    eval_batch_size: int = 8
    ce_weight: float = 0.0      # draft only
    # Runs with a teacher (draft, heads):
    init: str | None = None     # start from these weights (fine-tuning)
    on_policy: int = 0          # target continuations to mix in (jaxdec.on_policy)
    on_policy_fraction: float = 0.75
    on_policy_temperature: float = 0.0  # 0: greedy continuations
    prompt_len: int = 64

    def __post_init__(self):
        if self.on_policy < 0 or not 0.0 < self.on_policy_fraction <= 1.0:
            raise ValueError(f"--on-policy must be >= 0 and --on-policy-fraction in (0, 1], got {self.on_policy} "
                             f"and {self.on_policy_fraction}")
        try:  # the sampler's own rules, checked before any work
            SamplingParams.create(self.on_policy_temperature)
        except ValueError as bad:
            raise ValueError(f"--on-policy-temperature: {bad}") from None


def _state_meta(config: dict, opts: RunOptions, teacher: str | None) -> dict:
    keep = {k: v for k, v in dataclasses.asdict(opts).items()
            if k not in ("save_every", "log_every", "eval_windows", "eval_batch_size")}
    return {"config": config, "options": keep, "teacher": teacher}


def train_run(run_dir: Path, cfg: ModelConfig | None, train_tokens: np.ndarray, opts: RunOptions, *,
              teacher=None, progress: bool = True, log=_log, stop_after: int | None = None, objective=None,
              init_params=None, batches=None):
    """Trains (or resumes) the run in `run_dir`; returns (params, info).

    `teacher`: a `jaxdec.Model` to distill from (frozen), or None for plain cross-entropy.
    `objective`: what to train (default: the decoder `cfg`, see `LanguageModel`).
    `init_params`: the weights to start from (default: `objective.init`, a fresh model).
    `batches(step)`: the step's int32 batch (default: `batch_at` over `train_tokens`).
    `stop_after`: stop (with a checkpoint) after this many steps of this call; for tests.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if objective is None:
        objective = LanguageModel(cfg, None if teacher is None else teacher.config, opts.ce_weight)
    meta = _state_meta(objective.describe(), opts, None if teacher is None else
                       hashlib.sha256(json.dumps(teacher.config.to_dict(), sort_keys=True).encode()).hexdigest()[:16])
    meta = {**json.loads(json.dumps(meta)), "schedule_changes": []}
    meta_path = run_dir / "run.json"
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if old is not None:
        meta["schedule_changes"] = old.get("schedule_changes", [])
        same = lambda m: {**m, "options": {k: v for k, v in m["options"].items() if k != "steps"},
                          "schedule_changes": None}
        if same(old) != same(meta):
            raise ValueError(f"{run_dir} holds a run with different settings ({meta_path}); "
                             f"use another --run or --workdir, or pass --fresh")

    teacher_params = None if teacher is None else _uncommitted(teacher.params)
    optimizer, schedule, train_step = _compiled_step(objective, opts.lr, opts.steps, opts.warmup, opts.weight_decay)
    params = objective.init(jax.random.key(opts.seed)) if init_params is None else _uncommitted(init_params)
    state = {"params": params, "opt_state": optimizer.init(params)}
    manager = ocp.CheckpointManager(
        (run_dir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False))
    step, wall = 0, 0.0
    latest = manager.latest_step()
    if latest is not None:
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        state, step, wall = _uncommitted(restored["state"]), int(restored["meta"]["step"]), float(restored["meta"]["wall_seconds"])
        log(f"resumed {run_dir} at step {step} ({wall:.0f} s of training so far)")
    if step > opts.steps:  # else the export would be a longer-trained model than asked for
        manager.close()
        raise ValueError(f"--steps {opts.steps} is fewer than the {step} steps {run_dir} has trained; "
                         f"give --steps >= {step}, another --run, or --fresh")
    if old != meta:
        storage.write_json(meta_path, meta)
    if old is not None and old["options"]["steps"] != opts.steps and step < opts.steps:
        # a new total length: the cosine schedule is re-stretched from here on (recorded)
        log(f"total steps changed from {old['options']['steps']} to {opts.steps} at step {step}")
        meta["schedule_changes"].append({"at_step": step, "from_steps": old["options"]["steps"],
                                         "to_steps": opts.steps})
        storage.write_json(meta_path, meta)

    def save(step, wall):
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"step": step, "wall_seconds": wall})), force=True)

    params, opt_state = state["params"], state["opt_state"]
    end = opts.steps if stop_after is None else min(opts.steps, step + stop_after)
    bar = tqdm(total=opts.steps, initial=step, disable=not progress, desc=run_dir.name,
               mininterval=5.0, dynamic_ncols=True)
    t_last, history = time.time(), []
    while step < end:
        batch = jnp.asarray(batches(step) if batches is not None else
                            batch_at(train_tokens, step, opts.batch_size, opts.seq_len, opts.seed))
        params, opt_state, metrics = train_step(params, opt_state, batch, teacher_params)
        step += 1
        if step % opts.log_every == 0 or step == end:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.time()
            history.append({"step": step, **metrics})
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{float(schedule(step)):.2e}")
            bar.update(step - bar.n)
            wall += now - t_last
            t_last = now
            if not progress:
                log(f"step {step} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if step % opts.save_every == 0 or step == end:
            jax.block_until_ready(params)
            now = time.time()
            wall += now - t_last
            t_last = now
            state = {"params": params, "opt_state": opt_state}
            save(step, wall)
            t_last = time.time()  # checkpoint writing is not training time
    bar.close()
    manager.wait_until_finished()
    manager.close()
    return params, {"step": step, "steps": opts.steps, "wall_seconds": round(wall, 1), "history": history,
                    "schedule_changes": meta["schedule_changes"]}


def export(out: Path, cfg: ModelConfig, params, tokenizer_path: Path, training: dict) -> Path:
    """Writes a `jaxdec.load`-able folder (atomically replaced)."""
    out = storage.check_replaceable(out, storage.CONFIG_FILE)
    with storage.written_atomically(out) as tmp:
        storage.save(tmp, cfg, jax.device_get(params), "float32")
        shutil.copy(tokenizer_path, tmp / "tokenizer.json")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}, indent=2))
        (tmp / "training.json").write_text(json.dumps(training, indent=2))
    return out


def _load_data(workdir: Path, seq_len: int):
    """(train tokens, held-out tokens, corpus.json) of the work folder, long enough for windows
    of `seq_len` + 1 tokens: every epoch of training windows non-empty, and a held-out window
    and probe window to evaluate on."""
    def tokens(name):
        try:
            return np.load(workdir / name)  # pickles are refused (allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {workdir / name}: {err}") from None
    train_tokens, held_tokens = tokens("train_tokens.npy"), tokens("held_out_tokens.npy")
    # An epoch starts at a random offset < seq_len, then needs seq_len + 1 tokens.
    if train_tokens.size < 2 * seq_len:
        raise ValueError(f"--seq-len {seq_len} needs at least {2 * seq_len} training tokens, but {workdir} holds "
                         f"{train_tokens.size}: use a shorter --seq-len or a larger corpus")
    for need, what, fix in ((seq_len + 1, f"--seq-len {seq_len}", "a shorter --seq-len or a larger corpus"),
                            (PROBE_LEN + 1, f"the {PROBE_LEN}-token probe window", "a larger corpus")):
        if held_tokens.size < need:
            raise ValueError(f"{what} needs at least {need} held-out tokens, but {workdir} holds {held_tokens.size}: "
                             f"use {fix}")
    return train_tokens, held_tokens, json.loads((workdir / "corpus.json").read_text())


def run_folder(workdir: Path, run: str) -> Path:
    """The run's folder in the work folder; `--fresh` removes it, so a name, never a path."""
    if not run or Path(run).name != run or run in (".", ".."):
        raise ValueError(f"--run must be a folder name inside --workdir, got {run!r}")
    return workdir / run


def discard_run(run_dir: Path) -> None:
    """--fresh: removes the run's folder, but only one that holds a run (run.json and
    checkpoints, what train_run writes) or nothing: the name may be a folder of the user's."""
    if not run_dir.exists():
        return
    strangers = sorted(p.name for p in run_dir.iterdir() if p.name not in ("run.json", "checkpoints")) \
        if run_dir.is_dir() else [run_dir.name]
    if strangers:
        raise ValueError(f"--fresh: {run_dir} is not only a training run (it holds {', '.join(strangers[:3])}); "
                         f"refusing to delete it: give another --run")
    shutil.rmtree(run_dir)


def load_teacher(name, workdir: Path, vocab_size: int):
    """The frozen target to distill from (float32), checked against the work folder's corpus:
    the same vocabulary size and, when it has a tokenizer, the same token numbering."""
    import jaxdec
    teacher = jaxdec.load(name, dtype="float32")
    if teacher.config.vocab_size != vocab_size:
        raise ValueError(f"teacher vocab_size {teacher.config.vocab_size} != the corpus's {vocab_size}")
    if teacher.tokenizer is not None and teacher.tokenizer.get_vocab() != read_tokenizer(workdir).get_vocab():
        raise ValueError(f"teacher {name} has another tokenizer than {workdir / 'tokenizer.json'}")
    return teacher


def run_stage(kind: str, args) -> dict:
    import jaxdec
    workdir = Path(args.workdir)
    run_dir = run_folder(workdir, args.run or kind)
    if args.out:  # before hours of training, not at the export
        storage.check_replaceable(args.out, storage.CONFIG_FILE)
        if kind == "draft" and Path(args.out).resolve() == _resolve(args.teacher).resolve():
            raise ValueError(f"--out {args.out} is the --teacher's folder: the draft would replace the target")
    corpus = prepare(workdir, args.vocab_size, args.corpus_root, args.include_tests)
    train_tokens, held_tokens, corpus = _load_data(workdir, args.seq_len)
    sizes = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim)
    cfg = make_config(corpus["vocab_size"], **sizes)
    teacher = load_teacher(args.teacher, workdir, cfg.vocab_size) if kind == "draft" else None
    draft_only = dict(ce_weight=args.ce_weight, init=args.init, on_policy=args.on_policy,
                      on_policy_fraction=args.on_policy_fraction, on_policy_temperature=args.on_policy_temperature,
                      prompt_len=args.prompt_len) if teacher else {}
    opts = RunOptions(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      warmup=args.warmup, weight_decay=args.weight_decay, save_every=args.save_every,
                      log_every=args.log_every, seed=args.seed, eval_windows=args.eval_windows, **draft_only)
    init = None
    if opts.init is not None:
        init = jaxdec.load(opts.init, dtype="float32")
        if init.config.to_dict() != cfg.to_dict():
            raise ValueError(f"--init {opts.init} holds a model of config {init.config.to_dict()}, but the sizes "
                             f"given (--hidden, --layers, ...) make {cfg.to_dict()}")
    if args.fresh:
        discard_run(run_dir)
    counts = param_counts(cfg)
    print(f"{kind}: {json.dumps(counts)}", flush=True)
    if teacher is not None:
        t_counts = param_counts(teacher.config)
        print(f"FLOPs/token: draft {counts['flops_per_token']:,} / target {t_counts['flops_per_token']:,} "
              f"= {counts['flops_per_token'] / t_counts['flops_per_token']:.4f}", flush=True)
    batches, generations = None, None
    if teacher is not None:
        from jaxdec import on_policy
        batches, generations = on_policy.training_data(teacher, train_tokens, held_tokens, workdir, run_dir.name, opts,
                                                       args.eval_generations, not args.no_progress, _log)
    params, info = train_run(run_dir, cfg, train_tokens, opts, teacher=teacher, progress=not args.no_progress,
                             init_params=None if init is None else init.params, batches=batches)

    t0 = time.time()
    eval_step = make_eval_step(cfg, None if teacher is None else teacher.config)
    t_params = None if teacher is None else teacher.params
    held = evaluate(eval_step, params, eval_windows(held_tokens, opts.seq_len, opts.eval_windows),
                    opts.eval_batch_size, t_params)
    probe_windows = eval_windows(held_tokens, PROBE_LEN, PROBE_WINDOWS)
    probe = evaluate(eval_step, params, probe_windows, PROBE_WINDOWS, t_params)
    on_generations = {}
    if generations is not None:
        on_gen = lambda p: evaluate(eval_step, p, generations, opts.eval_batch_size, t_params, opts.prompt_len - 1)
        on_generations = {"held_out_generations": {
            "what": on_policy.describe_generations(generations, opts.prompt_len, opts.on_policy_temperature),
            "draft": on_gen(params), **({"init": on_gen(init.params)} if init is not None else {})}}
    eval_seconds = round(time.time() - t0, 1)
    print(f"held-out: {json.dumps(held)}\nprobe: {json.dumps(probe)}", flush=True)
    if on_generations:
        print(f"held-out generations: {json.dumps(on_generations)}", flush=True)
    training = {
        "command": "python -m jaxdec.train " + " ".join(sys.argv[1:]),
        "kind": kind, "corpus": corpus, "config": cfg.to_dict(), **counts,
        "options": dataclasses.asdict(opts), "teacher": args.teacher if teacher is not None else None,
        "steps": info["step"], "schedule_changes": info["schedule_changes"], "tokens_seen": info["step"] * opts.batch_size * opts.seq_len,
        "train_wall_seconds": info["wall_seconds"], "eval_seconds": eval_seconds,
        "final_train_metrics": info["history"][-1] if info["history"] else None,
        "held_out": held, **on_generations, "uniform_loss": math.log(cfg.vocab_size),
        "probe": {**probe, "seq_len": PROBE_LEN, "token_ids": probe_windows.tolist()},
        "versions": {"jax": jax.__version__, "python": sys.version.split()[0]},
        "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
    }
    if teacher is not None:
        t_counts = param_counts(teacher.config)
        training["teacher_flops_per_token"] = t_counts["flops_per_token"]
        training["flops_ratio"] = counts["flops_per_token"] / t_counts["flops_per_token"]
    if args.out:
        export(Path(args.out), cfg, params, workdir / "tokenizer.json", training)
        print(f"exported {args.out}", flush=True)
    return training


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxdec.train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--workdir", required=True, type=FOLDER, help="work folder: tokenized corpus and resumable runs")
        # The corpus settings: a prepared work folder's own unless given (then they must match).
        p.add_argument("--vocab-size", type=POSITIVE, default=None,
                       help=f"default: the work folder's, else {DEFAULT_VOCAB_SIZE}")
        p.add_argument("--corpus-root", default=None,
                       help="default: the work folder's, else sysconfig.get_paths()['stdlib']")
        p.add_argument("--include-tests", action="store_true", default=None,
                       help="keep test/, tests/, idle_test/ (default: as the work folder was prepared)")

    common(sub.add_parser("tokenizer", help="train the tokenizer and tokenize the corpus"))
    for kind, model, defaults in (("target", TARGET_CONFIG, dict(steps=800, batch_size=8, seq_len=512, lr=2e-3, warmup=60)),
                                  ("draft", DRAFT_CONFIG, dict(steps=800, batch_size=8, seq_len=512, lr=3e-3, warmup=50))):
        p = sub.add_parser(kind, help=f"train the {kind} model")
        common(p)
        p.add_argument("--out", default=None, help="export folder (jaxdec.load-able)")
        if kind == "draft":
            p.add_argument("--teacher", required=True, help="the target: anything jaxdec.load takes")
            p.add_argument("--ce-weight", type=WEIGHT, default=0.0, help="weight of cross-entropy added to the KL")
            from jaxdec import on_policy
            on_policy.add_arguments(p, "start from this draft's weights (anything jaxdec.load takes)")
        p.add_argument("--run", default=None, help=f"the run's folder in --workdir (default: {kind})")
        p.add_argument("--hidden", type=POSITIVE, default=model["hidden_size"])
        p.add_argument("--intermediate", type=POSITIVE, default=model["intermediate_size"])
        p.add_argument("--layers", type=POSITIVE, default=model["num_hidden_layers"])
        p.add_argument("--heads", type=POSITIVE, default=model["num_attention_heads"])
        p.add_argument("--kv-heads", type=POSITIVE, default=model["num_key_value_heads"])
        p.add_argument("--head-dim", type=POSITIVE, default=model["head_dim"])
        p.add_argument("--steps", type=POSITIVE, default=defaults["steps"])
        p.add_argument("--batch-size", type=POSITIVE, default=defaults["batch_size"])
        p.add_argument("--seq-len", type=POSITIVE, default=defaults["seq_len"])
        p.add_argument("--lr", type=RATE, default=defaults["lr"])
        p.add_argument("--warmup", type=COUNT, default=defaults["warmup"])
        p.add_argument("--weight-decay", type=WEIGHT, default=0.1)
        p.add_argument("--save-every", type=POSITIVE, default=50)
        p.add_argument("--log-every", type=POSITIVE, default=25)
        p.add_argument("--eval-windows", type=POSITIVE, default=1024,
                       help="held-out windows of --seq-len tokens to evaluate (at most all of them)")
        p.add_argument("--seed", type=COUNT, default=0)
        p.add_argument("--fresh", action="store_true", help="discard this run's checkpoints first")
        p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    from jaxdec import train_heads
    train_heads.add_commands(sub, common)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        if args.command in train_heads.HEAD_DEFAULTS:
            train_heads.run_heads_stage(args.command, args)
        elif args.command == "tokenizer":
            prepare(Path(args.workdir), args.vocab_size, args.corpus_root, args.include_tests)
        else:
            run_stage(args.command, args)
    except (ValueError, FileNotFoundError) as err:  # bad settings or inputs: one line, as argparse's
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")
    except KeyboardInterrupt:  # Ctrl-C: the user's own stop; the checkpoints written so far are whole
        parser.exit(130, f"\n{parser.prog} {args.command}: interrupted; the same command resumes from the last "
                         f"checkpoint\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
