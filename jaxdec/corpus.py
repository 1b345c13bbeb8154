"""The demo corpus: which files, the held-out split, the tokenizer, the tokenized stream and
the windows cut from it (`python -m jaxdec.train tokenizer` writes them; `jaxdec/train.py`
trains on them).

Corpus: the Python source of this interpreter's standard library (`*.py` under
`sysconfig.get_paths()["stdlib"]`, without `site-packages` and without the test suites, see
`TEST_DIRS`), read as UTF-8 (undecodable files skipped), sorted by relative path. A fixed
~4% of the files is held out, chosen by a stable hash of the relative path (`is_held_out`).
Every file is one document followed by the EOS token; documents are concatenated and cut
into packed windows.

Tokenizer: byte-level BPE (`tokenizers`), specials `<unk>`=0, `<s>`=1, `</s>`=2 (EOS), a
ByteLevel decoder, so decoding round-trips source code (indentation included) exactly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from jaxdec import storage

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# Test suites are left out: they are ~60% of the stdlib's bytes, mostly assertion
# boilerplate and large data literals, and a CPU budget of a few million tokens is better
# spent on library code (what a demo prompt like "def fib(n):" continues).
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
HELD_OUT_PER_MILLE = 40  # ~4% of the files
DEFAULT_VOCAB_SIZE = 4096
# Byte-level BPE starts from the 256 bytes and the specials; the stream is stored as uint16.
VOCAB_SIZE_RANGE = (256 + len(SPECIAL_TOKENS), 2 ** 16)


def is_held_out(relative_path: str) -> bool:
    """The fixed split: sha256 of the '/'-separated relative path, first 8 bytes, mod 1000."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < HELD_OUT_PER_MILLE


def corpus_files(root=None, include_tests: bool = False):
    """Sorted [(relative path, text)] of the *.py files under `root` (default: the stdlib),
    and a dict of counts of what was skipped."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files, skipped = [], {"test_dirs": 0, "undecodable": 0}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "site-packages")
        rel_dir = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            if not include_tests and TEST_DIRS.intersection(rel_dir):
                skipped["test_dirs"] += 1
                continue
            try:
                text = (Path(dirpath) / name).read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                skipped["undecodable"] += 1
                continue
            files.append(("/".join((*rel_dir, name)), text))
    files.sort()
    return files, skipped


def train_tokenizer(texts, vocab_size: int = DEFAULT_VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for token, want in zip(SPECIAL_TOKENS, (UNK_ID, BOS_ID, EOS_ID)):
        if tokenizer.token_to_id(token) != want:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}, want {want}")
    return tokenizer


def encode_documents(tokenizer, texts) -> np.ndarray:
    """The documents' token ids, each followed by EOS, concatenated (uint16)."""
    ids = [np.asarray(enc.ids + [EOS_ID], np.uint16) for enc in tokenizer.encode_batch(list(texts))]
    return np.concatenate(ids) if ids else np.zeros((0,), np.uint16)


def _check_same_corpus(info: dict, info_path: Path, vocab_size, corpus_root, include_tests) -> None:
    """ValueError when a setting given differs from the one the work folder was prepared with
    (reusing it would silently train on another corpus or tokenizer than asked for)."""
    recorded = {"--vocab-size": info.get("requested_vocab_size", info["vocab_size"]),
                "--corpus-root": Path(info["stdlib"]).resolve(), "--include-tests": info["include_tests"]}
    given = {"--vocab-size": vocab_size, "--corpus-root": None if corpus_root is None else Path(corpus_root).resolve(),
             "--include-tests": include_tests}
    for flag, value in given.items():
        if value is not None and value != recorded[flag]:
            raise ValueError(f"{flag} {value} differs from the {recorded[flag]} that {info_path} was prepared with: "
                             f"leave it out, or use another --workdir")


def _check_work_folder(workdir: Path, info_path: Path) -> None:
    """ValueError for a --workdir that preparing would write into wrongly: a file, a folder
    below a file, a checkpoint (its tokenizer.json would be replaced), or a folder with a
    tokenizer.json of its own but no corpus.json."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} is a file, not a folder")
    storage.check_makeable(workdir)
    for marker in (storage.CONFIG_FILE, storage.HEADS_FILE):
        if (workdir / marker).is_file():
            raise ValueError(f"--workdir {workdir} is a checkpoint ({marker}), not a work folder: preparing it would "
                             f"replace its tokenizer.json; give a new folder")
    if not info_path.exists() and (workdir / "tokenizer.json").exists():
        raise ValueError(f"--workdir {workdir} holds a tokenizer.json but no corpus.json: not a work folder of "
                         f"jaxdec.train (or one whose preparation was cut short); give a new folder")


def prepare(workdir: Path, vocab_size: int | None = None, corpus_root=None, include_tests: bool | None = None,
            log=functools.partial(print, flush=True)) -> dict:
    """Trains the tokenizer and tokenizes the corpus into `workdir` (once; then reused).

    Settings left None are the work folder's when it is prepared (given ones must match it),
    else the defaults: `DEFAULT_VOCAB_SIZE` tokens, the stdlib, without the test suites.
    """
    workdir = Path(workdir)
    info_path = workdir / "corpus.json"
    _check_work_folder(workdir, info_path)
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {info_path}: {err}") from None
        if not isinstance(info, dict) or not {"vocab_size", "stdlib", "include_tests"} <= info.keys():
            raise ValueError(f"{info_path} is damaged (no vocab_size, stdlib or include_tests): prepare a new "
                             f"--workdir")
        _check_same_corpus(info, info_path, vocab_size, corpus_root, include_tests)
        return info
    vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    if not VOCAB_SIZE_RANGE[0] <= vocab_size <= VOCAB_SIZE_RANGE[1]:
        raise ValueError(f"--vocab-size must be in [{VOCAB_SIZE_RANGE[0]}, {VOCAB_SIZE_RANGE[1]}] (every byte and "
                         f"{len(SPECIAL_TOKENS)} specials; ids stored as uint16), got {vocab_size}")
    include_tests = bool(include_tests)
    corpus_root = Path(corpus_root or sysconfig.get_paths()["stdlib"]).resolve()
    t0 = time.time()
    files, skipped = corpus_files(corpus_root, include_tests)
    train = [(p, t) for p, t in files if not is_held_out(p)]
    held = [(p, t) for p, t in files if is_held_out(p)]
    log(f"corpus: {len(files)} files ({len(train)} train, {len(held)} held out), skipped {skipped}")
    if not train or not held:  # before writing anything: a written corpus.json is reused as is
        raise ValueError(f"--corpus-root {corpus_root} has {len(train)} training and "
                         f"{len(held)} held-out *.py files (skipped {skipped}); both must be non-empty "
                         f"(~{HELD_OUT_PER_MILLE / 10:g}% of the files are held out)")
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer([t for _, t in train], vocab_size)
    train_ids = encode_documents(tokenizer, [t for _, t in train])
    held_ids = encode_documents(tokenizer, [t for _, t in held])
    mismatches = sum(tokenizer.decode(enc.ids, skip_special_tokens=False) != text
                     for enc, (_, text) in zip(tokenizer.encode_batch([t for _, t in files]), files))
    info = {
        "python": sys.version.split()[0],
        "stdlib": str(corpus_root),
        "include_tests": include_tests,
        "requested_vocab_size": vocab_size,
        "excluded_dirs": [] if include_tests else sorted(TEST_DIRS),
        "split_rule": f"held out iff int.from_bytes(sha256(relative_path).digest()[:8], 'big') % 1000 "
                      f"< {HELD_OUT_PER_MILLE}",
        "files": len(files), "train_files": len(train), "held_out_files": len(held),
        "skipped": skipped,
        "bytes": sum(len(t.encode()) for _, t in files),
        "train_tokens": int(train_ids.size), "held_out_tokens": int(held_ids.size),
        "vocab_size": tokenizer.get_vocab_size(),
        "round_trip_mismatches": int(mismatches),
        "seconds": round(time.time() - t0, 1),
    }
    tokenizer.save(str(workdir / "tokenizer.json"))
    np.save(workdir / "train_tokens.npy", train_ids)
    np.save(workdir / "held_out_tokens.npy", held_ids)
    storage.write_json(info_path, info)
    log(json.dumps(info, indent=2))
    return info


# --------------------------------------------------------------------------- windows

@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_tokens: int, seq_len: int):
    rng = np.random.default_rng([seed, epoch, 7919])
    offset = int(rng.integers(seq_len))
    count = (num_tokens - 1 - offset) // seq_len
    if count < 1:  # batch_at would look for the window in later epochs forever
        raise ValueError(f"a stream of {num_tokens} tokens holds no window of seq_len {seq_len} + 1 at offset {offset}")
    return offset, rng.permutation(count)


def batch_at(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
    """int32 [batch_size, seq_len + 1]: step's windows, a pure function of the step.

    Each epoch cuts the stream into non-overlapping windows at a random offset and visits
    them in a random order; so a resumed run sees exactly the batches an unbroken one would.
    """
    rows = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch = 0
        while True:  # epochs have (almost) the same length; find the one holding window i
            offset, order = _epoch_order(seed, epoch, tokens.size, seq_len)
            if i < order.size:
                break
            i -= order.size
            epoch += 1
        start = offset + int(order[i]) * seq_len
        rows.append(tokens[start:start + seq_len + 1])
    return np.stack(rows).astype(np.int32)


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """Up to max_windows non-overlapping windows [n, seq_len + 1] spread evenly over tokens."""
    total = (tokens.size - 1) // seq_len
    index = np.unique(np.linspace(0, total - 1, min(total, max_windows)).astype(int))
    return np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in index]).astype(np.int32)
