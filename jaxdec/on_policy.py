"""The target's own continuations, as training data for a draft model.

A draft distilled on corpus text learns the target's next-token distribution where the
target reads human-written code; at decoding time it must predict the target's *own*
output, which drifts from the corpus (repetitive, more regular). Distilling also on windows
the target wrote itself (on-policy distillation, as in DistillSpec) trains the draft where
speculative decoding uses it. `python -m jaxdec.train draft|medusa|eagle --on-policy N` does
this (draft heads are fine-tuned the same way, as Medusa's self-distillation and EAGLE train
on the target's own generations):

- `continuations` draws N prompts of `prompt_len` tokens at random places of the training
  stream and lets the target continue each (`jaxdec.generate`, batched): greedily, or sampled
  at `--on-policy-temperature` (decoding at temperature 1 reads the target's samples, which
  stray further from the corpus than its greedy text: the shipped draft's expected acceptance
  at temperature 1 is 92.0% on greedy continuations, 83.7% on sampled ones; checkpoints/
  README.md, "Sampled continuations"). Every row is one window of `seq_len + 1` tokens; rows
  are cached in the work folder (rewritten atomically after every batch, so an interrupted
  run resumes where it stopped).
- `mixed_batch_at` builds each training batch from `fraction` of these rows and corpus
  windows for the rest (`jaxdec.corpus.batch_at`), a pure function of the step like the
  corpus batches, so a resumed run sees the batches an unbroken one would.

The loss is unchanged: KL(target || draft) at every position of the window. With
`--eval-generations M` the export also records how the result (and the `--init` it started
from) predicts M held-out continuations: the held-out measure closest to what decoding sees.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jaxdec.cli import COUNT, POSITIVE, WEIGHT
from jaxdec.generate import generate
from jaxdec.sampling import SamplingParams
from jaxdec.storage import write_json
from jaxdec.corpus import batch_at

PROMPT_SEED_SALT = 15485863  # prompts' places: independent of the corpus batches' seeds
ORDER_SEED_SALT = 104729
SAMPLE_SEED_SALT = 7919


def prompt_starts(num_tokens: int, count: int, prompt_len: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, PROMPT_SEED_SALT])
    return rng.integers(0, num_tokens - prompt_len, count)


def continuations(teacher, tokens: np.ndarray, count: int, prompt_len: int, length: int, seed: int,
                  cache: Path, batch_size: int = 64, progress: bool = True, log=print,
                  temperature: float = 0.0) -> np.ndarray:
    """int32 [count, length]: `prompt_len` tokens of `tokens`, then the teacher's continuation
    (never stopped at EOS), greedy or sampled at `temperature`. Resumes from, and keeps, the
    rows in `cache`; a batch's samples depend only on the seed and where the batch starts, so a
    resumed run writes the rows an unbroken one would."""
    if not 0 < prompt_len < length:
        raise ValueError(f"prompt_len must be in [1, {length - 1}] (the window is {length} tokens), got {prompt_len}")
    if count < 1:
        raise ValueError(f"on-policy sample count must be >= 1, got {count}")
    SamplingParams.create(temperature)  # the sampler's own rules, before anything is written
    if tokens.size <= prompt_len:
        raise ValueError(f"the training stream ({tokens.size} tokens) must be longer than prompt_len={prompt_len}")
    cache = Path(cache)
    meta = {"count": count, "prompt_len": prompt_len, "length": length, "seed": seed, "temperature": temperature,
            "teacher": teacher.config.to_dict(), "train_tokens": int(tokens.size)}
    meta_path = cache.with_suffix(".json")
    rows = np.zeros((0, length), np.int32)
    if cache.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        rows = np.load(cache)
    starts = prompt_starts(tokens.size, count, prompt_len, seed)
    if len(rows) < count:
        log(f"on-policy: {len(rows)} of {count} target continuations cached in {cache}")
    write_json(meta_path, meta)
    bar = tqdm(total=count, initial=len(rows), disable=not progress, desc="target continuations",
               mininterval=5.0, dynamic_ncols=True)
    t0 = time.time()
    while len(rows) < count:
        batch_starts = starts[len(rows):len(rows) + batch_size]
        prompts = [tokens[s:s + prompt_len].tolist() for s in batch_starts]
        sample_seed = int(np.random.default_rng([seed, len(rows), SAMPLE_SEED_SALT]).integers(2**62))
        out = generate(teacher, prompts, max_new_tokens=length - prompt_len, stop_token_ids=[],
                       temperature=temperature, seed=sample_seed)
        new = np.asarray([p + list(t) for p, t in zip(prompts, out.tokens)], np.int32)
        rows = np.concatenate([rows, new])
        tmp = cache.with_name(cache.name + ".tmp.npy")
        np.save(tmp, rows)
        os.replace(tmp, cache)  # never a half-written cache
        bar.update(len(new))
        if not progress:
            log(f"on-policy: {len(rows)}/{count} continuations ({time.time() - t0:.0f} s)")
    bar.close()
    return rows


@functools.lru_cache(maxsize=2)
def _sample_order(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, ORDER_SEED_SALT]).permutation(count)


def mixed_batch_at(tokens: np.ndarray, samples: np.ndarray, step: int, batch_size: int, seq_len: int,
                   seed: int, fraction: float) -> np.ndarray:
    """int32 [batch_size, seq_len + 1]: round(fraction * batch_size) rows of `samples` (each
    visited once per epoch, in an order fixed by the seed), then corpus windows."""
    if samples.shape[1] != seq_len + 1:
        raise ValueError(f"on-policy rows hold {samples.shape[1]} tokens, the windows {seq_len + 1}")
    n_on = int(round(fraction * batch_size))
    picks = [_sample_order(seed, i // len(samples), len(samples))[i % len(samples)]
             for i in range(step * n_on, (step + 1) * n_on)]
    rows = samples[np.asarray(picks, np.int64)]
    if n_on < batch_size:
        rows = np.concatenate([rows, batch_at(tokens, step, batch_size - n_on, seq_len, seed)])
    return rows.astype(np.int32)


def add_arguments(p, init_help: str) -> None:
    """The fine-tuning options of `python -m jaxdec.train draft|medusa|eagle`."""
    p.add_argument("--init", default=None, help=init_help)
    p.add_argument("--on-policy", type=COUNT, default=0, metavar="N",
                   help="distill also on N continuations written by the teacher (jaxdec/on_policy.py)")
    p.add_argument("--on-policy-temperature", type=WEIGHT, default=0.0, metavar="T",
                   help="sample the teacher's continuations (training and held-out) at T; 0: greedy. "
                        "Match the temperature you will decode at")
    p.add_argument("--on-policy-fraction", type=float, default=0.75, help="share of each batch they fill")
    p.add_argument("--prompt-len", type=POSITIVE, default=64, help="corpus tokens before each continuation")
    p.add_argument("--eval-generations", type=COUNT, default=128, metavar="N",
                   help="held-out teacher continuations to evaluate on (0: none)")


def training_data(teacher, train_tokens: np.ndarray, held_tokens: np.ndarray, workdir: Path, run_name: str, opts,
                  eval_generations: int, progress: bool, log=print):
    """(batches, generations) for a run distilled from `teacher` with `jaxdec.train.RunOptions`
    opts: `batches(step)` mixing `opts.on_policy` cached continuations into the corpus batches
    (None: corpus batches only), and `eval_generations` held-out continuations [M, seq_len + 1]
    to evaluate on (None when 0)."""
    length, temperature = opts.seq_len + 1, opts.on_policy_temperature
    batches = generations = None
    if opts.on_policy:
        samples = continuations(teacher, train_tokens, opts.on_policy, opts.prompt_len, length, opts.seed,
                                Path(workdir) / f"{run_name}-continuations.npy", progress=progress, log=log,
                                temperature=temperature)
        batches = lambda step: mixed_batch_at(train_tokens, samples, step, opts.batch_size, opts.seq_len,
                                              opts.seed, opts.on_policy_fraction)
    if eval_generations:
        sampled = f"-t{temperature:g}" if temperature else ""  # runs at other temperatures keep their own
        generations = continuations(teacher, held_tokens, eval_generations, opts.prompt_len, length, opts.seed + 1,
                                    Path(workdir) / f"held-out-continuations-{opts.seq_len}{sampled}.npy",
                                    progress=progress, log=log, temperature=temperature)
    return batches, generations


def describe_generations(generations: np.ndarray, prompt_len: int, temperature: float = 0.0) -> str:
    how = f"sampled at temperature {temperature:g}" if temperature else "greedily"
    return (f"{len(generations)} held-out prompts of {prompt_len} tokens, each continued {how} by the teacher "
            f"for {generations.shape[1] - prompt_len} tokens; metrics over the generated tokens")
