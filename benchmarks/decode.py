"""Decoding speed of every method side by side, on held-out prompts.

    python benchmarks/decode.py --target demo-target --draft demo-draft \
        --methods ar,draft,layerskip,lookup --max-new-tokens 128 --num-prompts 8 \
        [--batch-size 1] [--temperature 0] [--prompt-set code|rewrite] --out results.json

Prompts come from the held-out files of the demo corpus (the standard library's Python
source, split as in `jaxdec.train`): `code` continues a file after a `def` line; `rewrite`
shows a function and asks for it again with one change, so the output repeats its context.
Each prompt batch runs every method in turn (the machine is shared and noisy, so methods are
interleaved rather than timed one after another), `--repeats` rounds of turns, each method
keeping its fastest run; compilation is excluded from the timings by an untimed warm-up pass over all
prompt batches, and reported separately. Greedy runs also record whether every
method gave exactly the plain-decoding tokens.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = {
    "ar": "plain autoregressive decoding",
    "draft": "spec.DraftModel(draft, num_tokens)",
    "draft-confidence": "spec.DraftModel(draft, num_tokens, confidence_threshold)",
    "draft-schedule": "spec.DraftModel(draft, num_tokens, adaptive_schedule=True)",
    "tree": "spec.DraftTree(draft, depth, top_k, max_nodes); tree:DxKxN sets them (default 5x4x32)",
    "medusa": "spec.Medusa(heads) with the heads' tree; medusa:N a tree of N nodes from their held-out accuracies",
    "eagle": "spec.Eagle(heads, depth, top_k, max_nodes); eagle:DxKxN sets them (default 5x4x32)",
    "layerskip": "spec.LayerSkip(skip_layers, num_tokens)",
    "lookup": "spec.PromptLookup(max_ngram=3, num_tokens=2*num_tokens); lookup:KxC drafts a tree of C matches",
}
NOT_YET = {"sparse": "spec.SparseSelf"}


def held_out_functions(min_lines: int = 6, max_chars: int = 1200):
    """(file, prefix text before a function, the function's text) from held-out corpus files."""
    from jaxdec.train import corpus_files, is_held_out
    files, _ = corpus_files()
    out = []
    for path, text in files:
        if not is_held_out(path):
            continue
        lines = text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if not re.match(r"\s*def \w+\(.*\):\s*$", line):
                continue
            indent = len(line) - len(line.lstrip())
            end = i + 1
            while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
                end += 1
            body = "".join(lines[i:end])
            if end - i >= min_lines and len(body) <= max_chars:
                out.append((path, "".join(lines[max(0, i - 30):i]), body))
    return out


def make_prompts(kind: str, count: int):
    functions = held_out_functions()
    step = max(1, len(functions) // count)
    chosen = functions[::step][:count]
    if kind == "code":
        return [prefix + body.splitlines(keepends=True)[0] for _, prefix, body in chosen]
    # rewrite: the function, then its header again; a faithful continuation copies the body.
    return [f"# Original version:\n{body}\n# The same function, with comments added:\n{body.splitlines(keepends=True)[0]}"
            for _, _, body in chosen]


def build_method(name, target, draft, num_tokens, skip_layers, confidence=0.3, heads=None):
    """A method name, optionally with its own draft length: "draft:6", "lookup:10", or a
    tree's shape: "tree:5x4x32" (depth x top_k x max_nodes), "lookup:8x4" (length x matches),
    "eagle:5x4x32", "medusa:24" (nodes). `heads`: {"medusa": Heads, "eagle": Heads}."""
    import jaxdec
    from jaxdec.heads import best_static_tree
    spec = jaxdec.spec
    name, _, k = name.partition(":")
    if name == "tree":
        return spec.DraftTree(draft, *(int(x) for x in k.split("x"))) if k else spec.DraftTree(draft)
    if name == "eagle":
        return spec.Eagle(heads["eagle"], *(int(x) for x in k.split("x"))) if k else spec.Eagle(heads["eagle"])
    if name == "medusa":
        medusa = heads["medusa"]
        return spec.Medusa(medusa, best_static_tree(medusa.config.accuracy, int(k)) if k else None)
    if name == "lookup" and "x" in k:
        length, candidates = (int(x) for x in k.split("x"))
        return spec.PromptLookup(max_ngram=3, num_tokens=length, num_candidates=candidates)
    num_tokens = int(k) if k else num_tokens
    if name == "ar":
        return None
    if name == "draft":
        return spec.DraftModel(draft, num_tokens)
    if name == "draft-confidence":
        return spec.DraftModel(draft, num_tokens, confidence_threshold=confidence)
    if name == "draft-schedule":
        return spec.DraftModel(draft, num_tokens, adaptive_schedule=True)
    if name == "layerskip":
        return spec.LayerSkip(skip_layers, num_tokens)
    return spec.PromptLookup(max_ngram=3, num_tokens=int(k) if k else 2 * num_tokens)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="demo-target")
    parser.add_argument("--draft", default="demo-draft")
    parser.add_argument("--medusa", default="demo-medusa", help="Medusa heads (jaxdec.load_heads)")
    parser.add_argument("--eagle", default="demo-eagle", help="an EAGLE layer (jaxdec.load_heads)")
    parser.add_argument("--methods", default="ar,draft,layerskip,lookup",
                        help="comma-separated; NAME:K sets that method's draft length, e.g. draft:6")
    parser.add_argument("--num-tokens", type=int, default=4)
    parser.add_argument("--skip-layers", default=None, help="comma-separated; default: every other inner layer")
    parser.add_argument("--confidence-threshold", type=float, default=0.3, help="of draft-confidence")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes; each (method, prompt batch) keeps its fastest, which filters out "
                             "the noise of a shared machine")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--prompt-set", choices=("code", "rewrite"), default="code")
    parser.add_argument("--mesh", default=None, help="not implemented yet (sharding)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    methods = args.methods.split(",")
    for m in (m.partition(":")[0] for m in methods):
        if m in NOT_YET:
            parser.error(f"method {m!r} ({NOT_YET[m]}) is not implemented yet")
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.mesh is not None:
        parser.error("--mesh: sharding is not implemented yet")

    from tqdm import tqdm
    import jaxdec
    from benchmarks.common import RESULTS_DIR, command_line, machine_info, versions, write_results

    target = jaxdec.load(args.target)
    draft = jaxdec.load(args.draft) if any(m.startswith("draft") for m in methods) else None
    layers = target.config.num_hidden_layers
    skip = ([int(i) for i in args.skip_layers.split(",")] if args.skip_layers
            else list(range(1, layers - 1, 2)))
    prompts = make_prompts(args.prompt_set, args.num_prompts)
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    heads = {kind: jaxdec.load_heads(getattr(args, kind)) for kind in ("medusa", "eagle")
             if any(m.partition(":")[0] == kind for m in methods)}
    specs = {m: build_method(m, target, draft, args.num_tokens, skip, args.confidence_threshold, heads)
             for m in methods}
    run = lambda m, batch: jaxdec.generate(target, batch, max_new_tokens=args.max_new_tokens,
                                           temperature=args.temperature, seed=0, speculative=specs[m])

    # Warm-up: one untimed pass compiles every step function of every method at every shape
    # bucket the prompts fall into. Its time, minus the timed pass's, is reported as compilation.
    warmup_seconds = {m: 0.0 for m in methods}
    for batch in tqdm(batches, desc="warm-up (compiling)"):
        for m in methods:
            start = time.perf_counter()
            run(m, batch)
            warmup_seconds[m] += time.perf_counter() - start

    totals = {m: {"new_tokens": 0, "decode_seconds": 0.0, "prefill_seconds": 0.0, "target_steps": 0,
                  "accepted_weighted": 0.0, "rows": 0, "identical": 0, "wall_seconds": 0.0} for m in methods}
    for batch in tqdm(batches, desc="prompt batches"):
        # Methods take turns, repeat after repeat, so a slow spell of the machine falls on all
        # of them alike; each keeps its fastest run.
        outs = {m: [] for m in methods}
        for _ in range(args.repeats):
            for m in methods:
                start = time.perf_counter()
                outs[m].append(run(m, batch))
                totals[m]["wall_seconds"] += (time.perf_counter() - start) / args.repeats
        reference = outs[methods[0]][0].tokens
        for m in methods:
            out = min(outs[m], key=lambda o: o.stats.decode_seconds)
            assert all(o.tokens == out.tokens for o in outs[m]), f"{m}: the same seed gave different tokens"
            t = totals[m]
            t["new_tokens"] += out.stats.new_tokens
            t["decode_seconds"] += out.stats.decode_seconds
            t["prefill_seconds"] += out.stats.prefill_seconds
            t["target_steps"] += out.stats.target_steps
            t["accepted_weighted"] += out.stats.mean_accepted * (out.stats.new_tokens - len(batch))
            t["rows"] += len(batch)
            t["identical"] += sum(a == b for a, b in zip(out.tokens, reference))

    results = []
    base = totals[methods[0]]["new_tokens"] / totals[methods[0]]["decode_seconds"]
    for m in methods:
        t = totals[m]
        tps = t["new_tokens"] / t["decode_seconds"]
        emitted = t["new_tokens"] - t["rows"]
        results.append({
            "method": m,
            "spec": METHODS[m.partition(":")[0]] + (f" with num_tokens={m.partition(':')[2]}" if ":" in m else ""),
            "tokens_per_second": tps,
            "mean_accepted": t["accepted_weighted"] / emitted if emitted else 1.0,
            "speedup_vs_ar": tps / base if methods[0] == "ar" else None,
            "new_tokens": t["new_tokens"],
            "decode_seconds": t["decode_seconds"],
            "prefill_seconds": t["prefill_seconds"],
            "target_steps": t["target_steps"],
            "compile_seconds": max(0.0, warmup_seconds[m] - t["wall_seconds"]),
            "rows_identical_to_first_method": t["identical"] / t["rows"],
        })
        r = results[-1]
        print(f"{m:17s} {tps:8.1f} tok/s  mean_accepted {r['mean_accepted']:.2f}  "
              f"speedup {r['speedup_vs_ar'] or float('nan'):.2f}x  identical {r['rows_identical_to_first_method']:.0%}")
    payload = {
        "benchmark": "decoding speed per method",
        "command": command_line(),
        "machine": machine_info(),
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"skip_layers": skip},
        "methods": results,
    }
    out = args.out or RESULTS_DIR / f"decode_{args.prompt_set}_b{args.batch_size}.json"
    print(f"wrote {write_results(out, payload)}")


if __name__ == "__main__":
    main()
