"""How well a draft model predicts its target's greedy output, and the tokens per target step
that greedy `spec.DraftModel` chains would get from it, without timing anything.

    python benchmarks/draft_agreement.py --target demo-target --draft demo-draft --category code \
        --context 256 --num-prompts 12 --max-new-tokens 128 --num-tokens 4 8 12 16 \
        --confidence-thresholds 0 0.02 0.1 --out benchmarks/results/draft_agreement_code_cpu.json

The target decodes the prompts greedily (as benchmarks/decode.py builds them); the draft then
reads each prompt and continuation in one forward, so at every new token it is known whether
the draft's argmax is the target's (`agreement`) and how sure the draft was (its top
probability, `confidence`). A greedy chain is accepted up to its first token that differs from
the target's, and until then the draft has read exactly the target's tokens, so the run of
agreements from where a round starts is what that round accepts: `predicted` replays the
rounds of `DraftModel(draft, num_tokens, confidence_threshold=t)` (a chain ends after a token
drafted with confidence below t) and gives tokens per target step, pooled as decode.py pools
them (all rows' tokens after the first over all their rounds). It equals what
`jaxdec.generate` reports (tests/test_benchmarks.py checks it) unless a near-tie of the draft's
logits falls the other way between this forward and the decoding program's. A draft is judged
in one forward per prompt instead of a decoding run per setting; the speed a round costs is
`verify_cost.py`'s to measure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (command_line, machine_info, refused_in_one_line, results_path,  # noqa: E402
                               versions, write_results)
from benchmarks.decode import category_prompts, load_prompts  # noqa: E402
from jaxdec.cli import COUNT, POSITIVE, WEIGHT  # noqa: E402
from jaxdec.spec import _check_draft_model  # noqa: E402

FIRST = 32  # agreement is reported over a row's first FIRST new tokens and over the rest apart


def draft_reads(draft, prompts: list[list[int]], outputs: list[list[int]]):
    """Per row, over its new tokens after the first (the first comes from the target's prefill):
    (agreement bool [n - 1]: the draft's argmax there is the target's token, confidence float [n - 1]:
    the draft's top probability there), from one forward of the draft over prompt + output."""
    import jax
    import jax.numpy as jnp
    from jaxdec.model import sequence_logits
    from jaxdec.sampling import argmax
    rows = [list(p) + list(o) for p, o in zip(prompts, outputs)]
    width = max(map(len, rows))  # right padding: causal attention keeps it out of every real position
    tokens = jnp.asarray([r + [0] * (width - len(r)) for r in rows], jnp.int32)
    logits = jax.jit(sequence_logits, static_argnums=0)(draft.config, draft.params, tokens)
    # The guess from the logits, as a greedy chain takes it (a softmax can round a near-tie to a tie).
    guess, confidence = np.asarray(argmax(logits)), np.asarray(jnp.max(jax.nn.softmax(logits, axis=-1), -1))
    reads = []
    for row, (p, o) in enumerate(zip(prompts, outputs)):
        at = slice(len(p), len(p) + len(o) - 1)  # the positions predicting new tokens 1..n-1
        reads.append((guess[row, at] == np.asarray(o[1:], np.int64), confidence[row, at]))
    return reads


def predicted(reads, num_tokens: int, threshold: float = 0.0) -> tuple[int, int]:
    """(tokens emitted after each row's first, rounds) of greedy DraftModel(draft, num_tokens,
    confidence_threshold=threshold) chains: each round accepts the run of agreements from its
    start, at most the chain's length, then emits the target's own token (the correction or
    the bonus), never past the row's end."""
    leading = lambda flags: int(np.argmin(flags)) if not flags.all() else len(flags)  # leading Trues
    tokens = rounds = 0
    for agree, confidence in reads:
        at, end = 0, len(agree)
        while at < end:
            sure = confidence[at:at + num_tokens] >= threshold  # the chain ends after its first unsure token
            length = min(leading(sure) + 1, len(sure))
            emitted = min(leading(agree[at:at + length]) + 1, end - at)
            tokens, rounds, at = tokens + emitted, rounds + 1, at + emitted
    return tokens, rounds


def summary(reads) -> dict:
    agree = np.concatenate([a for a, _ in reads])
    confidence = np.concatenate([c for _, c in reads])
    median = float(np.median(confidence))
    low = confidence <= np.quantile(confidence, 0.1)
    share = lambda parts: float(np.concatenate(parts).mean()) if sum(map(len, parts)) else None  # None: no such tokens
    return {"tokens": int(agree.size), "agreement": float(agree.mean()),
            f"agreement_first_{FIRST}": share([a[:FIRST - 1] for a, _ in reads]),
            f"agreement_after_{FIRST}": share([a[FIRST - 1:] for a, _ in reads]),
            "confidence_quantiles": {q: float(np.quantile(confidence, float(q))) for q in ("0.1", "0.25", "0.5", "0.75")},
            "agreement_above_median_confidence": float(agree[confidence > median].mean()),
            "agreement_lowest_tenth_confidence": float(agree[low].mean())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="demo-target")
    parser.add_argument("--draft", default="demo-draft")
    parser.add_argument("--category", default="code", help="one of benchmarks/data/prompts.json's categories")
    parser.add_argument("--context", type=COUNT, default=256, help="tokens of each prompt's context (as decode.py)")
    parser.add_argument("--num-prompts", type=POSITIVE, default=12)
    parser.add_argument("--max-new-tokens", type=POSITIVE, default=128)
    parser.add_argument("--num-tokens", type=POSITIVE, nargs="+", default=[4, 8, 12, 16], help="chain lengths")
    parser.add_argument("--confidence-thresholds", type=WEIGHT, nargs="+", default=[0.0])
    parser.add_argument("--out", type=results_path, default="benchmarks/results/draft_agreement.json")
    args = parser.parse_args(argv)

    import jaxdec
    with refused_in_one_line(parser):  # an unknown category, a missing checkpoint, a draft of another vocabulary
        texts = load_prompts([args.category])[args.category]
        target, draft = jaxdec.load(args.target), jaxdec.load(args.draft)
        _check_draft_model("draft_agreement.py", draft, target, same_devices=False)  # what DraftModel checks
        if target.tokenizer is None:
            raise ValueError(f"--target {args.target!r} has no tokenizer; the prompts are text")
    room = target.config.max_position_embeddings - args.max_new_tokens
    with refused_in_one_line(parser):
        prompts = category_prompts(target.tokenizer, texts, args.num_prompts, args.context, room)
    outputs = jaxdec.generate(target, prompts, max_new_tokens=args.max_new_tokens).tokens
    reads = draft_reads(draft, prompts, outputs)
    rows = []
    for threshold in args.confidence_thresholds:
        for k in args.num_tokens:
            tokens, rounds = predicted(reads, k, threshold)
            rows.append({"num_tokens": k, "confidence_threshold": threshold, "tokens": tokens, "rounds": rounds,
                         "predicted_mean_accepted": tokens / rounds if rounds else 1.0})
    payload = {"benchmark": "draft agreement with the target's greedy output, and greedy chains' tokens per step",
               "machine": machine_info(), "versions": versions(), "command": command_line(),
               "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
               "summary": summary(reads), "chains": rows}
    path = write_results(args.out, payload)
    s, fmt = payload["summary"], lambda x: "-" if x is None else f"{x:.3f}"
    print(f"agreement {s['agreement']:.3f} over {s['tokens']} tokens (first {FIRST}: "
          f"{fmt(s[f'agreement_first_{FIRST}'])}, after: {fmt(s[f'agreement_after_{FIRST}'])}); "
          f"median confidence {s['confidence_quantiles']['0.5']:.3f}")
    for r in rows:
        print(f"num_tokens {r['num_tokens']:3d} threshold {r['confidence_threshold']:<5g} "
              f"tokens per step {r['predicted_mean_accepted']:.2f}")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
