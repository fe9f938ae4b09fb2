"""Config-only model folders for the memory plan of the 7B setting (no Llama weights exist offline).

    python tools/plan_models.py               # cache/plan_models/{llama-2-7b,llama-guard-7b,seeds.txt}
    python tools/plan_models.py --layers 4    # the same models cut to 4 layers (*-L4 folders)

Each folder holds what the abstract build (`RealSetting.build(weights="abstract")`) reads and nothing
else: config.json with the published Llama-2-7B shapes (Llama Guard 7B is a fine-tuned Llama-2-7B:
the same shapes) and a small word-level tokenizer whose ids stay below the models' vocabulary (32000).
No safetensors file is written, so a build that tried to read weights would fail. The plan's figures
depend on the shapes, not on the tokenizer: the judge shares the players' tokenizer (as Llama Guard
shares Llama 2's), "safe" and "unsafe" are single tokens, and every prompt template tokenizes. The
seed file holds 128 questions (the game draws batch_size of them per step).

Then, e.g.:

    make experiment NAME=real_llama7b_gpo_div ARGS="plan=true parallel.data=1 parallel.fsdp=16 \\
        defender.checkpoint=cache/plan_models/llama-2-7b attacker.checkpoint=cache/plan_models/llama-2-7b \\
        real.judge.checkpoint=cache/plan_models/llama-guard-7b real.seed_prompts=cache/plan_models/seeds.txt"
"""

from __future__ import annotations

import argparse
import json
import pathlib

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

# config.json of meta-llama/Llama-2-7b-hf (the published numbers); Llama Guard 7B has the same shapes.
LLAMA_2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": 0.02,
    "torch_dtype": "float16",
}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3 (bos 1, eos 2 as in Llama 2)
TOPICS = ["a lock", "a car", "a bank vault", "a password", "a phone", "a fence", "a safe", "an alarm",
          "a website", "a door", "a bike", "a laptop", "a printer", "a router", "a camera", "a drone"]
ASKS = ["How do I open", "How can I break into", "What is the easiest way to disable",
        "Explain how to get around", "Tell me how to copy", "How would someone steal",
        "Write a story about", "What tools do I need to fix"]


def seed_questions() -> list[str]:
    """128 short questions (8 asks x 16 topics)."""
    return [f"{ask} {topic}?" for ask in ASKS for topic in TOPICS]


def word_tokenizer(vocab_limit: int) -> Tokenizer:
    """A whitespace/punctuation word-level tokenizer over the templates and the seed questions."""
    from alignjax.rewards.lm_judge import LLAMA_GUARD_TEMPLATE
    from alignjax.text.templates import ATTACKER_TEMPLATE, DEFENDER_TEMPLATE

    corpus = [LLAMA_GUARD_TEMPLATE, DEFENDER_TEMPLATE, ATTACKER_TEMPLATE, "safe unsafe", *seed_questions(),
              "I am sorry, I cannot help with that. Sure, here is how you do it: first, then, finally."]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.add_special_tokens(SPECIALS)
    if tok.get_vocab_size() > vocab_limit:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} ids > the vocabulary {vocab_limit}")
    return tok


def write_model(folder: pathlib.Path, config: dict, tok: Tokenizer) -> pathlib.Path:
    """config.json + tokenizer.json + tokenizer_config.json, no weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    return folder


def write_all(out: pathlib.Path, layers: int | None = None) -> dict[str, pathlib.Path]:
    """The defender/attacker folder, the judge folder and the seed file under `out`."""
    config = dict(LLAMA_2_7B, num_hidden_layers=layers or LLAMA_2_7B["num_hidden_layers"])
    tag = f"-L{layers}" if layers else ""
    tok = word_tokenizer(config["vocab_size"])
    seeds = out / "seeds.txt"
    out.mkdir(parents=True, exist_ok=True)
    seeds.write_text("\n".join(seed_questions()) + "\n")
    return {"player": write_model(out / f"llama-2-7b{tag}", config, tok),
            "judge": write_model(out / f"llama-guard-7b{tag}", config, tok), "seeds": seeds}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="cache/plan_models", type=pathlib.Path)
    p.add_argument("--layers", type=int, default=None, help="cut the models to this many layers")
    args = p.parse_args(argv)
    paths = write_all(args.out, args.layers)
    print(f"defender.checkpoint={paths['player']} attacker.checkpoint={paths['player']} "
          f"real.judge.checkpoint={paths['judge']} real.seed_prompts={paths['seeds']}")


if __name__ == "__main__":
    main()
