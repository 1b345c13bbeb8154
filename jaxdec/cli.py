"""The `jaxdec` command line.

    jaxdec generate ["PROMPT"] [--model demo-target] [--draft demo-draft] [--method draft]
                    [--num-tokens 4] [--tree 5x4x32] [--paths 0 1 0.0 ...]
                    [--heads demo-medusa|demo-eagle] [--skip-layers 1 ...] [--budget 1024]
                    [--max-ngram 3] [--num-candidates 1]
                    [--max-new-tokens 128] [--temperature 0]
                    [--top-p 1] [--top-k 0] [--min-p 0] [--seed 0] [--dtype bfloat16]
                    [--attn-impl pallas] [--mesh data=1,model=8]

With no prompt argument the prompt is read from standard input when it is piped, else a demo
prompt is used. The text is streamed as it is accepted; the stats follow on stderr.

--mesh shards the models over a data x model mesh of devices. With JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or JAXDEC_DISTRIBUTED=1 on a SLURM / Open MPI /
TPU pod cluster) every process runs the same command over all hosts' devices; process 0
writes the output.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import signal
import sys
import threading


def at_least(low, kind=int, strict=False):
    """An argparse type: a `kind` >= low (> low if strict), so a bad count or rate fails in one
    line before any work (the training and benchmark commands use these too). Floats must be
    finite (a learning rate of inf trains to NaN weights) and integers below 2**31 (larger
    ones overflowed inside JAX as a traceback)."""
    def parse(text):
        value = kind(text)  # a ValueError here is argparse's "invalid int value"
        if not (value > low if strict else value >= low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        if not (math.isfinite(value) if kind is float else value < 2**31):
            raise argparse.ArgumentTypeError(f"must be {'finite' if kind is float else 'below 2**31'}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


# Integers >= 1 and >= 0; floats > 0 (learning rates) and >= 0 (weights of losses, decays).
POSITIVE, COUNT, RATE = at_least(1), at_least(0), at_least(0.0, float, strict=True)
WEIGHT = at_least(0.0, float)


def FOLDER(text):  # noqa: N802 - an argparse type, named as the others
    """An argparse type: a folder path that is not empty ("" would be the working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a folder, got {text!r}")
    return text

METHODS = ("ar", "draft", "pearl", "tree", "static", "medusa", "eagle", "layerskip", "sparse", "triforce", "lookup")
DEMO_PROMPT = "def fibonacci(n):"
# --method static's tree when --paths is left out: the draft's first choice five deep, with
# second choices at the first two levels (8 nodes).
STATIC_PATHS = ("0", "1", "0.0", "0.1", "1.0", "0.0.0", "0.0.0.0", "0.0.0.0.0")


# The methods that read each method-specific flag (argparse's dest names).
FLAG_METHODS = {
    "draft": ("draft", "pearl", "tree", "static", "triforce"),
    "num_tokens": ("draft", "pearl", "layerskip", "sparse", "triforce", "lookup"),
    "tree": ("tree", "eagle"), "paths": ("static", "medusa"), "heads": ("medusa", "eagle"),
    "skip_layers": ("layerskip",), "budget": ("sparse", "triforce"),
    "max_ngram": ("lookup",), "num_candidates": ("lookup",),
}


# The flags that only sampling reads: greedy decoding (--temperature 0) has no randomness to filter.
SAMPLING_FLAGS = ("top_k", "top_p", "min_p", "seed")


def ignored_flags(args, defaults) -> list[str]:
    """One line for each flag set away from its default that this run does not read: a
    method-specific flag that args.method does not use (a typo in --method, or leaving it
    out, would hide that), or a sampling flag when decoding greedily. Not an error: a script
    may pass one set of flags to every method."""
    given = lambda dest: getattr(args, dest) != defaults[dest]
    flag = lambda dest: "--" + dest.replace("_", "-")
    lines = [f"{flag(dest)} applies to --method {', '.join(methods)}; --method {args.method} ignores it"
             for dest, methods in FLAG_METHODS.items() if args.method not in methods and given(dest)]
    if args.temperature == 0:
        lines += [f"{flag(dest)} applies when sampling (--temperature > 0); greedy decoding ignores it"
                  for dest in SAMPLING_FLAGS if given(dest)]
    return lines


def build_speculative(args, target):
    import jaxdec
    # The draft and heads where the target is, in the dtype asked for.
    place = dict(dtype=args.dtype, mesh=target.config.mesh)
    if args.method == "ar":
        return None
    if args.method == "draft":
        return jaxdec.spec.DraftModel(jaxdec.load(args.draft, **place), num_tokens=args.num_tokens)
    if args.method == "pearl":  # the draft on a device the target leaves free, to overlap them
        from jaxdec import sharding
        draft = jaxdec.load(args.draft, dtype=args.dtype, mesh=sharding.spare_device_mesh(target.config.mesh))
        return jaxdec.spec.Pearl(draft, num_tokens=args.num_tokens)
    if args.method == "tree":
        return jaxdec.spec.DraftTree(jaxdec.load(args.draft, **place), *tree_shape(args.tree))
    if args.method == "static":
        return jaxdec.spec.StaticTree(jaxdec.load(args.draft, **place), tree_paths(args.paths or STATIC_PATHS))
    if args.method in ("medusa", "eagle"):
        heads = jaxdec.load_heads(args.heads or f"demo-{args.method}", **place)
        if args.method == "medusa":
            return jaxdec.spec.Medusa(heads, None if args.paths is None else tree_paths(args.paths))
        return jaxdec.spec.Eagle(heads, *tree_shape(args.tree))
    if args.method == "layerskip":
        layers = target.config.num_hidden_layers
        # Every other inner layer; a 2-layer model has none, so it skips its last (a draft of
        # all layers would be the target itself); LayerSkip refuses a 1-layer model.
        skip = args.skip_layers if args.skip_layers is not None else list(range(1, layers - 1, 2)) or [layers - 1]
        return jaxdec.spec.LayerSkip(skip, num_tokens=args.num_tokens)
    if args.method in ("sparse", "triforce"):
        draft = jaxdec.load(args.draft, **place) if args.method == "triforce" else None
        return jaxdec.spec.SparseSelf(budget=args.budget, num_tokens=args.num_tokens, draft=draft)
    return jaxdec.spec.PromptLookup(max_ngram=args.max_ngram, num_tokens=args.num_tokens,
                                    num_candidates=args.num_candidates)


def tree_shape(text: str, flag: str = "--tree") -> tuple[int, int, int]:
    """"DEPTHxTOP_KxMAX_NODES" -> (depth, top_k, max_nodes), each >= 1 (benchmarks/verify_cost.py's
    --tree-rounds reads them so too); a ValueError naming `flag` and the text otherwise."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.strip().isdecimal() and int(p) > 0 for p in parts):
        raise ValueError(f"{flag} must be DEPTHxTOP_KxMAX_NODES of positive integers, e.g. 5x4x32, got {text!r}")
    return tuple(int(p) for p in parts)


def tree_paths(words) -> list[tuple[int, ...]]:
    """["0", "1", "0.0"] -> [(0,), (1,), (0, 0)]: each node as its child ranks joined by dots;
    a ValueError naming the word otherwise (spec.StaticTree checks the tree itself)."""
    paths = []
    for word in words:
        ranks = word.split(".")
        if not all(r.isdecimal() for r in ranks):
            raise ValueError(f"--paths: each node is child ranks joined by dots, e.g. 0 1 0.0 0.1, got {word!r}")
        paths.append(tuple(int(r) for r in ranks))
    return paths


class TextStream:
    """Writes a row's text as its tokens grow. Each update decodes only the row's tail: the
    tokens since the write before last, so that the decoder sees the context it would in the
    whole row (a word's leading space, one character's bytes split over tokens), and writes
    what that tail's text adds past the last write. Decoding the whole row at every update
    made a long stream quadratic (1 s of detokenizing in 4000 tokens)."""

    def __init__(self, tokenizer, out, head: str = ""):
        self.tokenizer, self.out = tokenizer, out
        self.pieces = None  # the text written so far; None: nothing yet, not even `head`
        self.head = head
        self.context = self.written = 0  # row[context:written]: the tokens of the last two writes

    def decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def update(self, row) -> None:
        if self.pieces is None:
            self.out.write(self.head)
            self.pieces = []
        before, text = self.decode(row[self.context:self.written]), self.decode(row[self.context:])
        # A trailing replacement character may be a UTF-8 sequence that the next tokens complete.
        if len(text) > len(before) and text.startswith(before) and not text.endswith("\ufffd"):
            self.pieces.append(text[len(before):])
            self.out.write(self.pieces[-1])
            self.out.flush()
            self.context, self.written = self.written, len(row)

    def finish(self, final: str) -> None:
        """Writes the rest of the row's whole text, `final` (all of it, on a new line, in the
        unexpected case that it does not continue what was written)."""
        shown = "".join(self.pieces or ())
        self.out.write(final[len(shown):] if final.startswith(shown) else "\n" + final)


class CtrlC:
    """Once decoding has started (the first `check`), Ctrl-C stops it at the next step, raised
    from here. The default handler raises KeyboardInterrupt wherever Python is, and in JAX's
    garbage-collection callback that exception is printed and dropped ("Exception ignored"):
    decoding then ran on to the end. Only in the main thread, where Python runs handlers."""

    def __init__(self):
        self.pressed, self.installed, self.previous = False, False, None

    def check(self) -> None:
        if not self.installed and threading.current_thread() is threading.main_thread():
            self.previous, self.installed = signal.signal(signal.SIGINT, self.press), True
        if self.pressed:
            raise KeyboardInterrupt

    def press(self, signum, frame) -> None:
        self.pressed = True

    def restore(self) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.SIG_DFL)


def _read_text(stream, name: str) -> str:
    try:
        return stream.read().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{name} is not UTF-8 text: {err.reason} at byte {err.start}") from None


def generate_command(args) -> int:
    import jaxdec
    prompt = args.prompt
    if prompt is None:
        piped = "" if sys.stdin is None or sys.stdin.isatty() else _read_text(sys.stdin.buffer, "stdin")
        prompt = piped if piped.strip() else DEMO_PROMPT  # nothing piped in: the demo prompt
    from jaxdec import sharding
    sharding.initialize_distributed()
    mesh = None if args.mesh is None else jaxdec.make_mesh(*sharding.parse_mesh(args.mesh))
    target = jaxdec.load(args.model, dtype=args.dtype, mesh=mesh, attn_impl=args.attn_impl)
    # Every process computes; process 0 speaks for them.
    out_stream, err_stream = (sys.stdout, sys.stderr) if jax_process_index() == 0 else (io.StringIO(), io.StringIO())
    if target.tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; the command line needs text")
    speculative = build_speculative(args, target)
    for line in ignored_flags(args, vars(parser().parse_args(["generate"]))):
        print(f"jaxdec: warning: {line}", file=err_stream)
    # The prompt goes out once decoding has started (the input was valid).
    streamed, ctrl_c = TextStream(target.tokenizer, out_stream, head=prompt), CtrlC()

    def stream(tokens):
        ctrl_c.check()
        streamed.update(tokens[0])

    try:
        out = jaxdec.generate(target, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                              speculative=speculative, on_progress=stream)
    finally:
        ctrl_c.restore()
    streamed.finish(out.texts[0])
    out_stream.write("\n")
    s = out.stats
    print(f"[{args.method}] {s.new_tokens} new tokens in {s.target_steps} target steps, mean accepted "
          f"{s.mean_accepted:.2f}, prefill {s.prefill_seconds:.2f} s, decode {s.decode_seconds:.2f} s, "
          f"{s.tokens_per_second:.1f} tokens/s (first run of a shape includes compilation)", file=err_stream)
    return 0


def jax_process_index() -> int:
    import jax
    return jax.process_index()


def parser() -> argparse.ArgumentParser:
    import jax

    import jaxdec
    from jaxdec import loading, storage
    top = argparse.ArgumentParser(prog="jaxdec", description="Lossless speculative decoding in JAX.")
    # The JAX version beside ours: which one runs is what a bug report or a benchmark needs.
    top.add_argument("--version", action="version",
                     version=f"jaxdec {jaxdec.__version__} (jax {jax.__version__}, jaxlib {jax.lib.__version__})")
    commands = top.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text from a prompt, streaming it")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt (default: stdin, or a demo prompt)")
    gen.add_argument("--model", default="demo-target", help="target checkpoint: a converted folder or shipped name")
    gen.add_argument("--draft", default="demo-draft",
                     help="draft checkpoint for --method draft, pearl, tree, static and triforce")
    gen.add_argument("--method", choices=METHODS, default="draft",
                     help="ar: plain decoding; draft: draft model; pearl: the draft model on a free device "
                          "drafting while the target verifies; tree: a token tree from the draft model; "
                          "static: a fixed tree shape (--paths) from the draft model; "
                          "medusa: Medusa heads' static tree; eagle: an EAGLE layer's dynamic tree; "
                          "layerskip: the target with layers skipped; sparse: the target over a budget of its KV cache "
                          "(long prompts); triforce: the draft model drafting for that sparse target; "
                          "lookup: prompt lookup (default: draft)")
    gen.add_argument("--num-tokens", type=int, default=4,
                     help="draft tokens per step for --method draft, pearl, layerskip, sparse, triforce and lookup")
    gen.add_argument("--tree", default="5x4x32",
                     help="DEPTHxTOP_KxMAX_NODES of --method tree and eagle (default 5x4x32; on a CPU 6x2x8 is faster)")
    gen.add_argument("--paths", nargs="+", default=None,
                     help="the tree of --method static and medusa, a node per word as child ranks joined by dots: "
                          "0 is the likeliest first token, 0.1 the second likeliest after it (default for static: "
                          f"{' '.join(STATIC_PATHS)}; for medusa: the tree shipped with the heads)")
    gen.add_argument("--heads", default=None,
                     help="draft heads for --method medusa or eagle (default: the shipped demo-medusa / demo-eagle)")
    gen.add_argument("--skip-layers", type=int, nargs="+", default=None,
                     help="layers to skip for --method layerskip (default: every other inner layer; layer 1 of a "
                          "2-layer model)")
    gen.add_argument("--budget", type=int, default=1024, help="KV-cache tokens the draft reads for --method sparse and triforce")
    gen.add_argument("--max-ngram", type=int, default=3, help="longest n-gram for --method lookup")
    gen.add_argument("--num-candidates", type=int, default=1,
                     help="earlier matches --method lookup drafts at once, merged into a tree")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=sorted(storage.DTYPES), default=None,
                     help="cast the models on load (default: as stored); bfloat16 may leave plain decoding's "
                          "tokens at near-ties (README, 'Numerics')")
    gen.add_argument("--attn-impl", choices=loading.ATTN_IMPLS, default=None,
                     help="the target's attention: xla (jax.numpy) or pallas (the tree-attention kernel; "
                          "interpret mode, slow, on a CPU); default: jaxdec.load's choice")
    gen.add_argument("--mesh", default=None,
                     help="shard over a device mesh, e.g. data=1,model=8 (default: one device)")
    gen.set_defaults(run=generate_command)
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"jaxdec: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the user's own stop, not a failure to show a traceback for
        print("\njaxdec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`jaxdec generate | head`): stop decoding, quietly
        # Python flushes stdout again at exit; pointed at /dev/null, that write cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
