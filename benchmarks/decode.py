"""Decoding speed of every method side by side: the benchmark table and its plots.

    python benchmarks/decode.py --target demo-target --draft demo-draft \
        --methods ar,draft,layerskip,lookup,tree,sparse --max-new-tokens 128 --num-prompts 8 \
        [--mesh data=1,model=8 ...] [--batch-size 1,8] [--context 256,1024] \
        [--category code,rewrite,qa,free] [--temperature 0 [--top-k K] [--top-p P]] --out results.json

Prompts come from benchmarks/data/prompts.json (built from text on the machine by
benchmarks/data/build_prompts.py), in four Spec-Bench-like categories: `code` completion of
held-out demo-corpus files, `rewrite` (a function asked for again: editing with long context),
`qa` over a given passage, `free` prose. `--context N` keeps the last N tokens of each
prompt's context before its task; a context shorter than N (the stored ones hold about 1k-4k
tokens) is preceded by the category's other contexts until it has N, like the other files of
a repository or the other pages of a document, and a context that would leave no room for
`--max-new-tokens` within the model's positions is cut to fit. Each JSON entry records the
context and prompt lengths used and the KV-cache slots (a power of two above prompt plus new
tokens) its batches ran with.

Every combination of mesh, category, context length and batch size is one configuration.
Within one, each prompt batch runs every method in turn (the machine is shared and noisy, so
methods are interleaved rather than timed one after another), `--repeats` rounds of turns,
each method keeping its fastest run; compilation is excluded by an untimed warm-up pass over
all prompt batches and reported separately. Greedy runs also record whether every method gave
exactly the first method's tokens. The JSON's `methods` holds one entry per method per
configuration; plots are written next to it (tokens/s per method, and speedup against batch
size, context length and devices where the sweep has more than one value).

Multi-host: with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (or
JAXDEC_DISTRIBUTED=1 on a cluster) every process runs this same command; process 0 writes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import plots  # noqa: E402
from benchmarks.common import refused_in_one_line, results_path  # noqa: E402
from jaxdec import storage  # noqa: E402
from jaxdec.cli import POSITIVE  # noqa: E402

PROMPTS_FILE = Path(__file__).resolve().parent / "data" / "prompts.json"

METHODS = {
    "ar": "plain autoregressive decoding",
    "draft": "spec.DraftModel(draft, num_tokens)",
    "draft-confidence": "spec.DraftModel(draft, num_tokens, confidence_threshold)",
    "draft-schedule": "spec.DraftModel(draft, num_tokens, adaptive_schedule=True)",
    "pearl": "spec.Pearl(draft on a spare device, num_tokens): drafts the next chain while the target verifies",
    "pearl-seq": "spec.Pearl(draft on a spare device, num_tokens, overlap=False): the same schedule, sequential",
    "tree": "spec.DraftTree(draft, depth, top_k, max_nodes); tree:DxKxN sets them (default 5x4x32)",
    "medusa": "spec.Medusa(heads) with the heads' tree; medusa:N a tree of N nodes from their held-out accuracies",
    "eagle": "spec.Eagle(heads, depth, top_k, max_nodes); eagle:DxKxN sets them (default 5x4x32)",
    "layerskip": "spec.LayerSkip(skip_layers, num_tokens)",
    "lookup": "spec.PromptLookup(max_ngram=3, num_tokens=2*num_tokens); lookup:KxC drafts a tree of C matches",
    "sparse": "spec.SparseSelf(budget, num_tokens): the target drafts over a budget of its own KV cache; "
              "sparse:B sets the budget (default 1024 tokens), sparse:BxK also the draft length",
    "triforce": "spec.SparseSelf(budget, num_tokens, draft=draft): the draft model drafts 2 tokens at a time for "
                "the sparse target (TriForce); triforce:B and triforce:BxK as for sparse",
}


# What may follow each method's name after a colon (integers joined by "x"): "draft:6",
# "tree:5x4x32" (depth x top_k x max_nodes), "lookup:8x4" (length x matches), "medusa:24"
# (nodes), "sparse:256x6" (budget x draft length; triforce the same, with the draft model).
METHOD_OPTIONS = {"ar": (), "draft": ("K",), "draft-confidence": ("K",), "draft-schedule": ("K",), "pearl": ("K",),
                  "pearl-seq": ("K",), "layerskip": ("K",), "tree": ("DxKxN",), "eagle": ("DxKxN",), "medusa": ("N",),
                  "lookup": ("K", "KxC"), "sparse": ("B", "BxK"), "triforce": ("B", "BxK")}


def method_options(method: str) -> tuple[str, tuple[int, ...]]:
    """"tree:8x2x8" -> ("tree", (8, 2, 8)). A ValueError naming the method for an unknown name
    or options its name does not take ("tree:8x2", "ar:4", "lookup:8x4x2", "draft:x"), so a
    typo is refused before anything loads rather than run with a default in its place."""
    name, colon, text = method.partition(":")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    parts = text.split("x") if colon else []
    forms = METHOD_OPTIONS[name]
    if colon and not (all(p.isdigit() for p in parts) and len(parts) in {len(f.split("x")) for f in forms}):
        takes = " or ".join(f"{name}:{f}" for f in forms) or "no options"
        raise ValueError(f"method {method!r}: {name} takes {takes} (integers)")
    return name, tuple(int(p) for p in parts)


def build_method(method, target, draft, num_tokens, skip_layers, confidence=0.02, heads=None, pearl_draft=None):
    """The jaxdec.spec object of a method name and its options (`method_options`); `num_tokens`
    is the draft length of those not given one. `heads`: {"medusa": Heads, "eagle": Heads}."""
    import jaxdec
    from jaxdec.heads import best_static_tree
    spec = jaxdec.spec
    name, opts = method_options(method)
    if name == "ar":
        return None
    if name == "tree":
        return spec.DraftTree(draft, *opts)
    if name == "eagle":
        return spec.Eagle(heads["eagle"], *opts)
    if name == "medusa":
        medusa = heads["medusa"]
        return spec.Medusa(medusa, best_static_tree(medusa.config.accuracy, *opts) if opts else None)
    if name == "lookup":
        return spec.PromptLookup(max_ngram=3, num_tokens=opts[0] if opts else 2 * num_tokens,
                                 num_candidates=opts[1] if len(opts) > 1 else 1)
    if name in ("sparse", "triforce"):
        return spec.SparseSelf(budget=opts[0] if opts else 1024, num_tokens=opts[1] if len(opts) > 1 else num_tokens,
                               draft=draft if name == "triforce" else None)
    num_tokens = opts[0] if opts else num_tokens
    if name == "draft":
        return spec.DraftModel(draft, num_tokens)
    if name in ("pearl", "pearl-seq"):
        return spec.Pearl(pearl_draft, num_tokens, overlap=name == "pearl")
    if name == "draft-confidence":
        return spec.DraftModel(draft, num_tokens, confidence_threshold=confidence)
    if name == "draft-schedule":
        return spec.DraftModel(draft, num_tokens, adaptive_schedule=True)
    return spec.LayerSkip(skip_layers, num_tokens)


def load_prompts(categories):
    data = json.loads(PROMPTS_FILE.read_text())["categories"]
    unknown = [c for c in categories if c not in data]
    if unknown:
        raise ValueError(f"unknown category {unknown[0]!r}; choose from {', '.join(data)}")
    return {c: data[c] for c in categories}


def category_prompts(tokenizer, texts: list[dict], count: int, context: int, max_tokens: int | None = None):
    """Token ids of the first `count` prompts of a category at `context` tokens (`prompt_ids`):
    a context shorter than that is preceded by the category's other contexts (the next
    prompts', in turn), whatever `count` is."""
    return [prompt_ids(tokenizer, p, context, [q["context"] for q in texts[i + 1:] + texts[:i]], max_tokens)
            for i, p in enumerate(texts[:count])]


def prompt_ids(tokenizer, prompt: dict, context: int, filler=(), max_tokens: int | None = None) -> list[int]:
    """The last `context` tokens of the prompt's context, then its task.

    A context shorter than `context` tokens is preceded by the texts in `filler`, one after
    another (each new one in front, a blank line between), until it is long enough: the other
    files or passages before it, as in a repository or a long document. `max_tokens` caps the
    whole prompt (context and task), cutting the context's front."""
    task = tokenizer.encode(prompt["task"]).ids
    if max_tokens is not None:
        if len(task) > max_tokens:  # the callers' room: the model's positions less --max-new-tokens
            raise ValueError(f"--max-new-tokens leaves room for prompts of {max_tokens} tokens in the model's "
                             f"positions, but a task alone has {len(task)}")
        context = max(0, min(context, max_tokens - len(task)))
    text = prompt["context"]
    ids = tokenizer.encode(text).ids
    for other in filler:
        if len(ids) >= context:
            break
        text = other + "\n\n" + text
        ids = tokenizer.encode(text).ids
    return (ids[-context:] if context > 0 else []) + task


def parse_list(text: str, name: str, low: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < low:
        raise ValueError(f"{name} must be a comma-separated list of integers >= {low}, got {text!r}")
    return values


def run_configuration(target, specs, prompts, batch_size, args, tqdm, label):
    """Every method over the prompt batches, interleaved: {method: totals}."""
    import jaxdec
    methods = list(specs)
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    run = lambda m, batch: jaxdec.generate(target, batch, max_new_tokens=args.max_new_tokens,
                                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=0,
                                           speculative=specs[m])
    # Warm-up: one untimed pass compiles every step function of every method at every shape
    # bucket the prompts fall into. Its time, minus the timed pass's, is reported as compilation.
    warmup_seconds = {m: 0.0 for m in methods}
    for batch in tqdm(batches, desc=f"{label}: warm-up (compiling)", disable=not args.progress):
        for m in methods:
            start = time.perf_counter()
            run(m, batch)
            warmup_seconds[m] += time.perf_counter() - start

    totals = {m: {"new_tokens": 0, "decode_seconds": 0.0, "prefill_seconds": 0.0, "target_steps": 0,
                  "active_row_steps": 0, "rows": 0, "identical": 0, "wall_seconds": 0.0,
                  "rounds_drafted_ahead": 0, "first_differences": []} for m in methods}
    for batch in tqdm(batches, desc=f"{label}: timed", disable=not args.progress):
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
            t["rounds_drafted_ahead"] += out.stats.rounds_drafted_ahead
            t["active_row_steps"] += out.stats.active_row_steps
            t["rows"] += len(batch)
            t["identical"] += sum(a == b for a, b in zip(out.tokens, reference))
            if args.temperature == 0:
                t["first_differences"] += first_differences(target, batch, reference, out.tokens)
    for m in methods:
        totals[m]["compile_seconds"] = max(0.0, warmup_seconds[m] - totals[m]["wall_seconds"])
    return totals


def first_differences(target, prompts, reference, tokens) -> list[dict]:
    """Where each greedy row that is not the reference's first differs: the new token's index,
    how far apart the target's logits for the two tokens are there (its own forward over the
    prompt and the common part) and how far the lower of them is below the best logit. Rounding
    makes them differ only at near-ties of the two best (README, "Numerics"); a large gap would
    be a bug."""
    import jaxdec
    out = []
    for prompt, want, got in zip(prompts, reference, tokens):
        if want == got:
            continue
        at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
        if at is None:  # one stopped earlier at the same tokens
            out.append({"at": min(len(want), len(got)), "logit_gap": None, "below_best": None})
            continue
        logits = jaxdec.logits(target, list(prompt) + list(want[:at]))[-1]  # numpy
        pair = logits[[want[at], got[at]]]
        out.append({"at": at, "logit_gap": float(abs(pair[0] - pair[1])),
                    "below_best": float(logits.max() - pair.min())})
    return out


def largest_gap(entry) -> str:
    gaps = [d["logit_gap"] for d in entry["first_differences"] if d["logit_gap"] is not None]
    return f", first differing where the target's two logits are at most {max(gaps):.2g} apart" if gaps else ""


def entries(totals, config: dict, weight_bytes: int):
    """The JSON entries of one configuration, speedups against its "ar" entry. `weight_bytes`:
    what one target forward reads of the target's weights (benchmarks.common)."""
    out = []
    tps = {m: t["new_tokens"] / t["decode_seconds"] for m, t in totals.items()}
    for m, t in totals.items():
        emitted = t["new_tokens"] - t["rows"]
        out.append({
            "method": m,
            "spec": METHODS[m.partition(":")[0]] + (f" with {m.partition(':')[2]}" if ":" in m else ""),
            **config,
            "tokens_per_second": tps[m],
            # Pooled over the batches (emitted tokens over active row steps), not the mean of
            # each batch's ratio, which overweights the batches that took few steps.
            "mean_accepted": emitted / t["active_row_steps"] if t["active_row_steps"] else 1.0,
            "speedup_vs_ar": tps[m] / tps["ar"] if "ar" in tps else None,
            # gpt-fast's "bandwidth achieved": for plain decoding, the target's weight bytes
            # read per second (the KV cache not counted); for a speculative method, the target's
            # share of its reads (the draft's come on top).
            "target_weight_gb_per_s": weight_bytes * t["target_steps"] / t["decode_seconds"] / 1e9,
            "new_tokens": t["new_tokens"],
            "decode_seconds": t["decode_seconds"],
            "prefill_seconds": t["prefill_seconds"],
            "target_steps": t["target_steps"],
            "active_row_steps": t["active_row_steps"],
            "rounds_drafted_ahead": t["rounds_drafted_ahead"],
            "compile_seconds": t["compile_seconds"],
            "rows_identical_to_first_method": t["identical"] / t["rows"],
            "first_differences": t["first_differences"],
        })
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="demo-target")
    parser.add_argument("--draft", default="demo-draft")
    parser.add_argument("--medusa", default="demo-medusa", help="Medusa heads (jaxdec.load_heads)")
    parser.add_argument("--eagle", default="demo-eagle", help="an EAGLE layer (jaxdec.load_heads)")
    parser.add_argument("--methods", default="ar,draft,layerskip,lookup",
                        help="comma-separated; NAME:OPTIONS as in METHOD_OPTIONS, e.g. draft:6 (a draft length), "
                             "tree:8x2x8 (depth x top_k x max_nodes)")
    parser.add_argument("--num-tokens", type=POSITIVE, default=4)
    parser.add_argument("--skip-layers", default=None, help="comma-separated; default: every other inner layer")
    parser.add_argument("--confidence-threshold", type=float, default=0.02,
                        help="of draft-confidence (0.02: the shipped draft's top probability is low even where it "
                             "agrees with the target; benchmarks/README.md, 'Adaptive draft length')")
    parser.add_argument("--repeats", type=POSITIVE, default=3,
                        help="timed passes; each (method, prompt batch) keeps its fastest, which filters out "
                             "the noise of a shared machine")
    parser.add_argument("--max-new-tokens", type=POSITIVE, default=128)
    parser.add_argument("--num-prompts", type=POSITIVE, default=8, help="prompts per category")
    parser.add_argument("--batch-size", default="1", help="comma-separated batch sizes, e.g. 1,8")
    parser.add_argument("--context", default="256",
                        help="comma-separated context lengths in tokens, e.g. 256,1024 (short contexts are preceded "
                             "by other prompts' contexts; cut to fit max_position_embeddings)")
    parser.add_argument("--category", "--prompt-set", dest="category", default="code",
                        help="comma-separated prompt categories: code, rewrite, qa, free (or all)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0, help="sampling filter (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sampling filter (1: off)")
    parser.add_argument("--attn-impl", choices=("xla", "pallas"), default="xla",
                        help="the target's attention (jaxdec.load's attn_impl): on a CPU pallas runs interpreted")
    parser.add_argument("--dtype", choices=sorted(storage.DTYPES), default=None,
                        help="cast every model and head set on load (default: the stored dtype)")
    parser.add_argument("--mesh", nargs="+", default=None,
                        help="one or more meshes, e.g. data=1,model=8 data=2,model=4 (none: one device)")
    parser.add_argument("--cpu-devices", type=POSITIVE, default=None,
                        help="on a CPU host, split it into N devices (for --mesh and pearl); sets XLA_FLAGS")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--out", type=results_path, default=None)
    args = parser.parse_args(argv)

    methods = args.methods.split(",")
    with refused_in_one_line(parser, "--methods: "):
        for m in methods:
            method_options(m)
    from jaxdec import sharding, steps
    with refused_in_one_line(parser):
        batch_sizes = parse_list(args.batch_size, "--batch-size")
        contexts = parse_list(args.context, "--context", low=0)
        categories = ["code", "rewrite", "qa", "free"] if args.category == "all" else args.category.split(",")
        prompt_sets = load_prompts(categories)
        meshes = [None if m == "none" else sharding.parse_mesh(m) for m in (args.mesh or ["none"])]

    if args.cpu_devices:  # read when JAX starts its backends, which nothing has done yet
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.cpu_devices}")
    sharding.initialize_distributed()
    from tqdm import tqdm
    import jax
    if jax.process_index() != 0:  # every process runs the benchmark; process 0 reports it
        sys.stdout, args.progress = open(os.devnull, "w"), False
    import jaxdec
    from benchmarks.common import (RESULTS_DIR, command_line, machine_info, streamed_weight_bytes, versions,
                                   write_results)
    from jaxdec.sampling import SamplingParams

    with refused_in_one_line(parser):  # every mesh and the sampling made before anything runs
        meshes = [(shape, None if shape is None else jaxdec.make_mesh(*shape)) for shape in meshes]
        SamplingParams.create(args.temperature, args.top_k, args.top_p)
    results = []
    for shape, mesh in meshes:
        with refused_in_one_line(parser):  # a missing or wrong checkpoint, --skip-layers that are not layers
            target = jaxdec.load(args.target, dtype=args.dtype, mesh=mesh, attn_impl=args.attn_impl)
            draft = jaxdec.load(args.draft, dtype=args.dtype, mesh=mesh) if any(m.startswith(("draft", "tree", "triforce")) for m in methods) else None
            skip = (parse_list(args.skip_layers, "--skip-layers", low=0) if args.skip_layers
                    else list(range(1, target.config.num_hidden_layers - 1, 2)))
            heads = {kind: jaxdec.load_heads(getattr(args, kind), dtype=args.dtype, mesh=mesh) for kind in ("medusa", "eagle")
                     if any(m.partition(":")[0] == kind for m in methods)}
        if max(skip, default=0) >= target.config.num_hidden_layers:
            parser.error(f"--skip-layers {args.skip_layers}: the target has {target.config.num_hidden_layers} layers")
        if target.tokenizer is None:
            parser.error(f"--target {args.target!r} has no tokenizer; the prompts are text")
        with refused_in_one_line(parser, f"--methods {args.methods!r}: "):  # e.g. sparse:8, draft:x, pearl multi-host
            pearl_draft = None
            if any(m.startswith("pearl") for m in methods):  # the draft on a device the target does not use
                pearl_draft = jaxdec.load(args.draft, dtype=args.dtype, mesh=sharding.spare_device_mesh(mesh))
            specs = {m: build_method(m, target, draft, args.num_tokens, skip, args.confidence_threshold, heads,
                                     pearl_draft) for m in methods}
        mesh_name = "one device" if shape is None else f"data={shape[0]},model={shape[1]}"
        weight_bytes = streamed_weight_bytes(target)
        devices = 1 if shape is None else shape[0] * shape[1]
        for category, texts in prompt_sets.items():
            for context in contexts:
                # The prompt plus the new tokens must fit the model's positions.
                room = target.config.max_position_embeddings - args.max_new_tokens
                with refused_in_one_line(parser):
                    prompts = category_prompts(target.tokenizer, texts, args.num_prompts, context, room)
                used = [len(ids) - len(target.tokenizer.encode(p["task"]).ids)
                        for ids, p in zip(prompts, texts)]
                if min(used) < context:
                    print(f"{category} context {context}: cut to {min(used)}..{max(used)} tokens, so that prompt "
                          f"plus --max-new-tokens {args.max_new_tokens} fit max_position_embeddings="
                          f"{target.config.max_position_embeddings}")
                for batch in batch_sizes:
                    label = f"{mesh_name} {category} context {context} batch {batch}"
                    totals = run_configuration(target, specs, prompts, batch, args, tqdm, label)
                    slots = sorted({steps.cache_bucket(target.config, max(map(len, prompts[i:i + batch]))
                                                       + args.max_new_tokens) for i in range(0, len(prompts), batch)})
                    config = {"mesh": mesh_name, "devices": devices, "category": category, "context": context,
                              "batch_size": batch, "context_tokens": [min(used), max(used)],
                              "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
                              "cache_slots": slots}
                    results += entries(totals, config, weight_bytes)
                    for r in results[-len(methods):]:
                        print(f"{label}: {r['method']:14s} {r['tokens_per_second']:8.1f} tok/s  mean_accepted "
                              f"{r['mean_accepted']:.2f}  speedup {r['speedup_vs_ar'] or float('nan'):.2f}x  "
                              f"target weights {r['target_weight_gb_per_s']:.1f} GB/s  "
                              f"identical {r['rows_identical_to_first_method']:.0%}")
    differing = [f"{r['method']} ({r['category']}, context {r['context']}, batch {r['batch_size']}, mesh "
                 f"{r['mesh']}): {r['rows_identical_to_first_method']:.0%}{largest_gap(r)}" for r in results
                 if r["rows_identical_to_first_method"] < 1.0]
    if args.temperature == 0:
        print(f"rows identical to {methods[0]}'s tokens: "
              + ("every method, every configuration" if not differing else "NOT " + "; ".join(differing)))
    if jax.process_index() != 0:
        return results
    payload = {
        "benchmark": "decoding speed per method",
        "command": command_line(),
        "machine": machine_info(),
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "progress")} | {"skip_layers": skip},
        "methods": results,
    }
    out = Path(args.out or RESULTS_DIR / f"decode_{'_'.join(categories)}_b{'-'.join(map(str, batch_sizes))}.json")
    print(f"wrote {write_results(out, payload)}")
    for path in plots.write_plots(results, out):
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
