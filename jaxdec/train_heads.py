"""Trains draft heads on a frozen target's own outputs: `python -m jaxdec.train medusa|eagle`.

    python -m jaxdec.train medusa --workdir W --teacher checkpoints/demo-target --out checkpoints/demo-medusa
    python -m jaxdec.train eagle  --workdir W --teacher checkpoints/demo-target --out checkpoints/demo-eagle

Same corpus, windows, optimizer, checkpoints, resuming and progress bar as the demo models
(`jaxdec.train`). Each step runs the frozen target over the windows (its features and its
next-token distributions, in the same jitted step) and distils them into the heads:

* Medusa: head k (1..K) reads the feature at t and learns the target's distribution at
  t + k (the token at t + 1 + k): KL(target || head), weighted 0.8^(k-1).
* EAGLE: the layer reads pairs (feature at t - 1, token at t) and learns the target's
  distribution at t through the target's LM head (KL), plus 0.1 x a smooth-L1 pull towards
  the target's feature. A second pass feeds the layer its own predicted features in place of
  the target's (as deeper tree levels do when drafting) and learns the same targets from them.

Held-out metrics (exported in `training.json`): per depth, how often the target's argmax is
the draft's rank-r token (Medusa: head d; EAGLE: depth 1 from true features, depth 2 from
its own), on held-out corpus windows and (`--eval-generations M`, default 128) on the
target's own greedy continuations of M held-out prompts, which is what decoding asks of the
heads. The latter are kept in the heads' config, and Medusa's default tree is built from
them (`best_static_tree`).

Like a draft model, heads can be fine-tuned on the target's own greedy continuations
(`jaxdec/on_policy.py`; Medusa-2's self-distillation, EAGLE's training on generated text):

    python -m jaxdec.train medusa --workdir W --teacher demo-target --init demo-medusa \
        --on-policy 2048 --run medusa-on-policy --steps 400 --batch-size 16 --seq-len 256 --lr 1e-3 --warmup 20
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdec import corpus, storage
from jaxdec.cli import COUNT, POSITIVE, RATE, WEIGHT
from jaxdec.config import ModelConfig
from jaxdec.heads import HEADS_FILE, HeadsConfig, best_static_tree, eagle_sequence, init_heads, medusa_logits, save_heads
from jaxdec.model import causal_mask, lm_head, step_hidden

RANKS = 8              # accuracies are measured for the draft's top RANKS tokens per depth
MEDUSA_DECAY = 0.8     # weight of head k's loss: MEDUSA_DECAY ** (k - 1)
EAGLE_FEATURE_WEIGHT = 0.1
MEDUSA_TREE_NODES = 16  # the shipped default tree's size


def target_outputs(cfg: ModelConfig, params, tokens):
    """The frozen target over whole windows: (features [B, T, D], log-probabilities [B, T, V])."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    hidden, _ = step_hidden(cfg, params, tokens, positions, None, causal_mask(B, T), read_cache=False)
    hidden = jax.lax.stop_gradient(hidden)
    return hidden, jax.lax.stop_gradient(jax.nn.log_softmax(lm_head(cfg, params, hidden)))


def _kl(t_logp, logits):
    """Mean KL(teacher || model) over positions."""
    return jnp.sum(jnp.exp(t_logp) * (t_logp - jax.nn.log_softmax(logits)), axis=-1).mean()


def _rank_hits(logits, t_logp):
    """int32 [RANKS + 1]: at how many positions the teacher's argmax is the model's rank-r
    token, then how many positions were scored."""
    _, top = jax.lax.top_k(logits, RANKS)
    hit = (top == jnp.argmax(t_logp, axis=-1)[..., None]).reshape(-1, RANKS)
    return jnp.append(jnp.sum(hit, axis=0, dtype=jnp.int32), hit.shape[0])


@dataclasses.dataclass(frozen=True)
class HeadsObjective:
    """Heads trained on a frozen target (`jaxdec.train.train_run`'s objective protocol)."""
    heads: HeadsConfig
    target_cfg: ModelConfig

    def init(self, rng):
        return init_heads(self.heads, rng)

    def describe(self) -> dict:
        # The settings only: the accuracies are a result, filled in at export.
        return {k: v for k, v in self.heads.to_dict().items() if k != "accuracy"}


@dataclasses.dataclass(frozen=True)
class MedusaObjective(HeadsObjective):
    def outputs(self, params, batch, teacher_params):
        """Per head k = 1..K: (its logits at t, the target's log-probabilities at t + k)."""
        features, t_logp = target_outputs(self.target_cfg, teacher_params, batch)
        logits = medusa_logits(self.target_cfg, teacher_params, params, features)          # [B, T, K, V]
        return [(logits[:, :-k, k - 1], t_logp[:, k:]) for k in range(1, self.heads.num_heads + 1)]

    def loss(self, params, batch, teacher_params):
        kls = [_kl(t, s) for s, t in self.outputs(params, batch, teacher_params)]
        weights = [MEDUSA_DECAY ** k for k in range(len(kls))]
        loss = sum(w * kl for w, kl in zip(weights, kls)) / sum(weights)
        return loss, {f"kl{k + 1}": kl for k, kl in enumerate(kls)}

    def hits(self, params, batch, teacher_params, first=0):
        return jnp.stack([_rank_hits(s[:, first:], t[:, first:]) for s, t in self.outputs(params, batch, teacher_params)])


@dataclasses.dataclass(frozen=True)
class EagleObjective(HeadsObjective):
    def outputs(self, params, batch, teacher_params):
        """(target features, target log-probabilities, predicted features from the target's,
        predicted features from its own first-pass predictions)."""
        features, t_logp = target_outputs(self.target_cfg, teacher_params, batch)
        first = eagle_sequence(self.heads, teacher_params, params, features, batch)
        second = eagle_sequence(self.heads, teacher_params, params, first, batch)
        return features, t_logp, first, second

    def loss(self, params, batch, teacher_params):
        features, t_logp, first, second = self.outputs(params, batch, teacher_params)
        head = lambda h: lm_head(self.target_cfg, teacher_params, h)
        kl1, kl2 = _kl(t_logp, head(first)), _kl(t_logp[:, 1:], head(second[:, 1:]))
        pull = jnp.mean(optax.huber_loss(first, features, delta=1.0))
        return kl1 + kl2 + EAGLE_FEATURE_WEIGHT * pull, {"kl1": kl1, "kl2": kl2, "feature_l1": pull}

    def hits(self, params, batch, teacher_params, first=0):
        features, t_logp, own, second = self.outputs(params, batch, teacher_params)
        scored = lambda h, start: _rank_hits(lm_head(self.target_cfg, teacher_params, h[:, start:]), t_logp[:, start:])
        # The second pass's position 0 had no predicted feature before it.
        return jnp.stack([scored(own, first), scored(second, max(first, 1))])


@functools.lru_cache(maxsize=4)
def _hits_step(objective):
    """One jitted `hits` per objective, so scoring several parameter sets (the heads and their
    --init) on the same windows compiles once."""
    return jax.jit(objective.hits, static_argnames="first")


def held_out_accuracy(objective, params, teacher_params, windows: np.ndarray, batch_size: int, first: int = 0) -> list:
    """accuracy[d][r]: how often, over the held-out windows, the target's argmax at depth d + 1
    is the draft's rank-r token (at the positions from `first` on)."""
    step = _hits_step(objective)
    hits = sum(np.asarray(step(params, jnp.asarray(windows[i:i + batch_size, :-1]), teacher_params, first=first),
                          np.int64)
               for i in range(0, len(windows), batch_size))                       # [depths, RANKS + 1]
    return (hits[:, :-1] / hits[:, -1:]).round(4).tolist()


HEAD_DEFAULTS = {
    "medusa": dict(steps=1000, batch_size=8, seq_len=512, lr=2e-3, warmup=50),
    "eagle": dict(steps=1000, batch_size=8, seq_len=512, lr=2e-3, warmup=50),
}


def run_heads_stage(kind: str, args) -> dict:
    """Trains (or resumes) and exports one set of heads; what `python -m jaxdec.train medusa|eagle` runs."""
    import jaxdec
    from jaxdec import on_policy, train
    workdir = Path(args.workdir)
    run_dir = train.run_folder(workdir, args.run or kind)
    if args.out:  # before the training, not at the export
        storage.check_replaceable(args.out, HEADS_FILE)
    opts = train.RunOptions(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                            warmup=args.warmup, weight_decay=args.weight_decay, save_every=args.save_every,
                            log_every=args.log_every, seed=args.seed, eval_windows=args.eval_windows, init=args.init,
                            on_policy=args.on_policy, on_policy_fraction=args.on_policy_fraction,
                            on_policy_temperature=args.on_policy_temperature, prompt_len=args.prompt_len)
    # Windows too short leave a head no position to learn from: its loss, the mean over none, is NaN.
    offset, why = ((args.num_heads, "head k learns at positions < length - k") if kind == "medusa"
                   else (1, "the second pass starts at position 1"))
    for length, what in ((opts.seq_len, "--seq-len is"), (train.PROBE_LEN, "the probe window is")):
        if length <= offset:
            raise ValueError(f"{kind} heads need windows of at least {offset + 1} tokens ({why}), but {what} {length}"
                             + (" tokens: use fewer --num-heads" if kind == "medusa" else ""))
    # Medusa's head k is scored at positions < seq_len - k: each needs a generated token there.
    deepest = args.num_heads if kind == "medusa" else 0
    if args.eval_generations and opts.prompt_len + deepest > opts.seq_len:
        raise ValueError(f"--prompt-len {opts.prompt_len} leaves no generated token to score every head on in "
                         f"windows of --seq-len {opts.seq_len} (need prompt_len + {deepest} <= seq_len)")
    corpus.prepare(workdir, args.vocab_size, args.corpus_root, args.include_tests)
    train_tokens, held_tokens, corpus_info = train._load_data(workdir, opts.seq_len)
    teacher = train.load_teacher(args.teacher, workdir, corpus_info["vocab_size"])
    if kind == "medusa":
        objective = MedusaObjective(HeadsConfig.medusa(teacher.config, args.num_heads), teacher.config)
    else:
        objective = EagleObjective(HeadsConfig.eagle(teacher.config), teacher.config)
    init = None
    if opts.init is not None:
        init = jaxdec.load_heads(opts.init, dtype="float32")
        shape = lambda cfg: {k: v for k, v in cfg.to_dict().items() if k not in ("accuracy", "tree")}  # not measured
        if shape(init.config) != shape(objective.heads):
            raise ValueError(f"--init {opts.init} holds heads of config {shape(init.config)}, but {kind} heads for "
                             f"{args.teacher} are {shape(objective.heads)}")
    batches, generations = on_policy.training_data(teacher, train_tokens, held_tokens, workdir, run_dir.name, opts,
                                                   args.eval_generations, not args.no_progress)
    if args.fresh:
        train.discard_run(run_dir)
    params, info = train.train_run(run_dir, None, train_tokens, opts, teacher=teacher, progress=not args.no_progress,
                                   objective=objective, init_params=None if init is None else init.params,
                                   batches=batches)
    t0 = time.time()
    accuracy_of = lambda p, windows, first=0: held_out_accuracy(objective, p, teacher.params, windows,
                                                                opts.eval_batch_size, first)
    windows = corpus.eval_windows(held_tokens, opts.seq_len, opts.eval_windows)
    accuracy = accuracy_of(params, windows)
    probe_windows = corpus.eval_windows(held_tokens, train.PROBE_LEN, train.PROBE_WINDOWS)
    probe = accuracy_of(params, probe_windows)
    on_generations = {}
    if generations is not None:
        on_generations = {"held_out_generations": {
            "what": on_policy.describe_generations(generations, opts.prompt_len, opts.on_policy_temperature),
            "accuracy_by_depth_and_rank": accuracy_of(params, generations, opts.prompt_len - 1),
            **({"init": accuracy_of(init.params, generations, opts.prompt_len - 1)} if init is not None else {})}}
    # The tree is built for what decoding sees: the target's own text when it was measured.
    chosen = on_generations["held_out_generations"]["accuracy_by_depth_and_rank"] if on_generations else accuracy
    heads_cfg = dataclasses.replace(objective.heads, accuracy=tuple(map(tuple, chosen)))
    if kind == "medusa":
        heads_cfg = dataclasses.replace(heads_cfg, tree=best_static_tree(chosen, MEDUSA_TREE_NODES))
    n_params = int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
    training = {
        "command": "python -m jaxdec.train " + " ".join(sys.argv[1:]),
        "kind": kind, "corpus": corpus_info, "teacher": args.teacher, "params": n_params,
        "options": dataclasses.asdict(opts), "steps": info["step"], "schedule_changes": info["schedule_changes"],
        "tokens_seen": info["step"] * opts.batch_size * opts.seq_len, "train_wall_seconds": info["wall_seconds"],
        "final_train_metrics": info["history"][-1] if info["history"] else None,
        "held_out": {"windows": int(len(windows)), "seq_len": opts.seq_len,
                     "accuracy_by_depth_and_rank": accuracy,
                     "what": ("accuracy[d][r]: share of held-out positions where the target's argmax at depth d + 1 "
                              "is the draft's rank-r token" + (" (depth 2: from the layer's own predicted features)"
                                                                if kind == "eagle" else ""))},
        **on_generations,
        "probe": {"accuracy_by_depth_and_rank": probe, "seq_len": train.PROBE_LEN, "token_ids": probe_windows.tolist()},
        "eval_seconds": round(time.time() - t0, 1),
        "versions": {"jax": jax.__version__, "python": sys.version.split()[0]},
        "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
    }
    print(f"held-out accuracy by depth (rank 0..{RANKS - 1}): {json.dumps(accuracy)}", flush=True)
    if on_generations:
        print(f"on held-out generations: {json.dumps(on_generations['held_out_generations'])}", flush=True)
    if args.out:
        save_heads(Path(args.out), heads_cfg, params, training)
        print(f"exported {args.out}", flush=True)
    return training


def add_commands(sub, common) -> None:
    """The `medusa` and `eagle` subcommands of `python -m jaxdec.train`."""
    from jaxdec import on_policy
    for kind, defaults in HEAD_DEFAULTS.items():
        p = sub.add_parser(kind, help=f"train {kind} draft heads on a frozen target")
        common(p)
        p.add_argument("--teacher", required=True, help="the target: anything jaxdec.load takes")
        p.add_argument("--out", default=None, help="export folder (jaxdec.load_heads-able)")
        p.add_argument("--run", default=None, help=f"the run's folder in --workdir (default: {kind})")
        on_policy.add_arguments(p, "start from these heads (anything jaxdec.load_heads takes)")
        if kind == "medusa":
            p.add_argument("--num-heads", type=POSITIVE, default=4, help="heads, for tree depths 1..K")
        for name in ("steps", "batch_size", "seq_len", "warmup"):
            p.add_argument("--" + name.replace("_", "-"), type=COUNT if name == "warmup" else POSITIVE,
                           default=defaults[name])
        p.add_argument("--lr", type=RATE, default=defaults["lr"])
        p.add_argument("--weight-decay", type=WEIGHT, default=0.0)
        p.add_argument("--save-every", type=POSITIVE, default=50)
        p.add_argument("--log-every", type=POSITIVE, default=25)
        p.add_argument("--eval-windows", type=POSITIVE, default=64, help="held-out windows for the accuracies")
        p.add_argument("--seed", type=COUNT, default=0)
        p.add_argument("--fresh", action="store_true", help="discard this run's checkpoints first")
        p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
