"""Quickstart: make a small Hugging Face Llama locally, convert it, and decode with jaxdec.

    python examples/quickstart.py [--workdir DIR] [--max-new-tokens 32]

Nothing is downloaded: the model has random weights (so its text is gibberish), built with
transformers and saved with save_pretrained, exactly as a real checkpoint folder would be.
The script checks jaxdec's greedy tokens against transformers' on the same weights.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
from pathlib import Path


def make_hf_llama(folder: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    torch.manual_seed(0)
    # A byte-level BPE tokenizer trained on this very file, so text prompts work.
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([__file__], trainer)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))


def hf_greedy(folder: Path, ids: list[int], new_tokens: int) -> list[int]:
    import torch
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    config = copy.deepcopy(hf.generation_config)
    config.update(eos_token_id=[], max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          generation_config=config)
    return out[0, len(ids):].tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="jaxdec-quickstart-"))
    hf_dir, jd_dir = workdir / "hf-llama", workdir / "jaxdec-llama"

    print(f"1. building a random Hugging Face Llama in {hf_dir}")
    make_hf_llama(hf_dir)
    print(f"2. converting: python -m jaxdec.convert {hf_dir} {jd_dir}")
    subprocess.run([sys.executable, "-m", "jaxdec.convert", str(hf_dir), str(jd_dir), "--overwrite"], check=True)

    import jaxdec
    model = jaxdec.load(jd_dir)
    prompts = ["def greet(name):", "import jaxdec\nmodel = jaxdec.load("]
    out = jaxdec.generate(model, prompts, max_new_tokens=args.max_new_tokens, stop_token_ids=[])
    print("3. jaxdec.generate, greedy:")
    for prompt, text in zip(prompts, out.texts):
        print(f"   {prompt!r} -> {text!r}")
    s = out.stats
    print(f"   stats: {s.new_tokens} new tokens, {s.target_steps} target steps, mean_accepted "
          f"{s.mean_accepted:.2f}, prefill {s.prefill_seconds:.2f} s (includes compilation), "
          f"decode {s.decode_seconds:.2f} s, {s.tokens_per_second:.0f} tokens/s")

    ids = model.tokenizer.encode(prompts[0]).ids
    same = hf_greedy(hf_dir, ids, args.max_new_tokens) == out.tokens[0]
    print(f"4. identical to transformers' greedy output: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
