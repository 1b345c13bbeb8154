"""benchmarks/decode.py under several XLA flag settings, alternated, folded into one file.

    python benchmarks/xla_flags.py --settings default,no_ynn_single_thread --passes 2 \
        --out benchmarks/results/decode_code_b1_xla_flags_quiet.json -- \
        --methods ar,draft:8,tree:8x2x8 --category code --batch-size 1 --num-prompts 12 \
        --max-new-tokens 128 --repeats 2

XLA reads `XLA_FLAGS` once per process, so each run is its own `decode.py` process. The
settings take turns (pass 1 of every setting, then pass 2, ...), so a machine that gets busier
or quieter during the runs moves every setting alike instead of favouring the ones run first.
Everything after `--` goes to decode.py as it is (its own --out is set here).

The folded file keeps every run's own results file, and per setting and method the mean over
its runs of tokens/s (each run keeps a method's fastest of its repeats), the speedup over plain
decoding (`ar`) of the same setting, and the speedup over the fastest plain decoding of any
setting (what a user who picks the best flags for each gets).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import results_path  # noqa: E402

from jaxdec.cli import POSITIVE  # noqa: E402

DECODE = Path(__file__).resolve().parent / "decode.py"

SETTINGS = {
    "default": "",
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn_individual_dot": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    "single_thread": "--xla_cpu_multi_thread_eigen=false",
    "no_ynn_single_thread": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_multi_thread_eigen=false",
    # The other matmul libraries XLA:CPU can hand dots to (experimental in jaxlib 0.10).
    "onednn_dot": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
}


def methods_of(result: dict) -> list[dict]:
    """decode.py's method entries from its results file, which must hold one configuration:
    the means below average a method over runs, not over configurations."""
    configurations = {(e["category"], e["context"], e["batch_size"], e["mesh"]) for e in result["methods"]}
    if len(configurations) > 1:
        raise ValueError(f"give decode.py one configuration (one category, context, batch size and mesh), "
                         f"got {len(configurations)}: {sorted(configurations, key=str)}")
    return result["methods"]


def fold(runs: list[dict]) -> dict:
    """Per-setting means over runs: {"mean_tokens_per_second", "speedup_within_setting",
    "speedup_vs_fastest_plain_decoding", "fastest_plain_decoding"}. `runs`: [{"setting",
    "run": decode.py's results file}]."""
    per_setting: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for entry in methods_of(run["run"]):
            per_setting.setdefault(run["setting"], {}).setdefault(entry["method"], []).append(entry["tokens_per_second"])
    means = {s: {m: sum(v) / len(v) for m, v in methods.items()} for s, methods in per_setting.items()}
    if any("ar" not in m for m in means.values()):
        raise ValueError("every setting needs plain decoding ('ar' in --methods) to compare against")
    fastest = max(means, key=lambda s: means[s]["ar"])
    return {
        "mean_tokens_per_second": means,
        "speedup_within_setting": {s: {k: v / m["ar"] for k, v in m.items() if k != "ar"} for s, m in means.items()},
        "speedup_vs_fastest_plain_decoding": {s: {k: v / means[fastest]["ar"] for k, v in m.items() if k != "ar"}
                                              for s, m in means.items()},
        "fastest_plain_decoding": {"setting": fastest, "tokens_per_second": means[fastest]["ar"]},
    }


def run_decode(setting: str, decode_args: list[str], out: Path) -> dict:
    """One decode.py process under the setting's XLA_FLAGS; its results file."""
    env = dict(os.environ, XLA_FLAGS=SETTINGS[setting])
    subprocess.run([sys.executable, str(DECODE), *decode_args, "--no-progress", "--out", str(out)], env=env,
                   check=True)
    return json.loads(out.read_text())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, decode_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="default,no_ynn_single_thread",
                        help=f"comma-separated, of: {', '.join(SETTINGS)}")
    parser.add_argument("--passes", type=POSITIVE, default=2, help="runs of each setting, alternated")
    parser.add_argument("--out", type=results_path, default=None)
    args = parser.parse_args(ours)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        parser.error(f"--settings: unknown setting {unknown[0] if unknown else args.settings!r}; "
                     f"choose from {', '.join(SETTINGS)}")
    if "--out" in decode_args or any(a.startswith("--out=") for a in decode_args):
        parser.error("give --out before the '--' (each run's own file is kept inside the folded one)")

    from benchmarks.common import RESULTS_DIR, command_line, git_revision, machine_info, versions, write_results

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in range(1, args.passes + 1):
            for setting in settings:
                print(f"pass {p}/{args.passes}, {setting}: XLA_FLAGS={SETTINGS[setting]!r}", flush=True)
                result = run_decode(setting, decode_args, Path(tmp) / f"{setting}_{p}.json")
                methods_of(result)  # several configurations fail here, after one run, not after all
                runs.append({"setting": setting, "pass": p, "run": result})
    folded = fold(runs)
    for setting in settings:
        row = "  ".join(f"{m} {v:.1f}" for m, v in folded["mean_tokens_per_second"][setting].items())
        print(f"{setting:22s} tokens/s: {row}")
    machine = machine_info()
    machine.pop("xla_flags")  # per run, in each run's own file
    payload = {"benchmark": "decode.py under several XLA flag settings, alternated",
               "command": command_line(), "machine": machine, "versions": versions(), "git": git_revision(),
               "settings": {s: SETTINGS[s] for s in settings}, "passes": args.passes,
               "aggregation": "mean over a setting's runs of each run's tokens_per_second (a method's fastest of "
                              "its repeats); speedups are those means over plain decoding's ('ar') mean",
               **folded, "runs": runs}
    out = args.out or RESULTS_DIR / "decode_xla_flags.json"
    print(f"wrote {write_results(out, payload)}")
    return payload


if __name__ == "__main__":
    main()
