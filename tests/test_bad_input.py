"""Bad input, table-driven (issue 15): every case goes through the CLI, `alignjax.cli NAME key=value`.

Each row of CASES is one input a user really produces. For every row three facts are checked against
what happened, not against the code: the exit status is 2 (a rejection, not a crash: no traceback);
the message names the culprit (a key, a file, a line or a token count: the row's regex); and the
working directory gained nothing but, at most, the run folder's config.yaml (a rejection found
while loading weights comes after config.yaml is written; every other one before).

Most rows call `alignjax.cli.main` in this process (the CLI's own function, the same code path as
`python -m alignjax.cli`, seconds cheaper); the rows marked SUBPROCESS run `python -m alignjax.cli`
for real. The real-setting rows use tiny Llama folders (tests/hf_fixtures.py, the word tokenizer of
tests/test_game_real.py) and copies of them, each damaged in one way.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Callable, NamedTuple

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from alignjax import cli
from alignjax.config import dump_yaml
from alignjax.settings import RealConfig
from tests.test_game_real import SEEDS, _checkpoint, _word_tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent
REAL = "real_llama7b_gpo_div"
EXIT = 2  # alignjax.cli: bad input
# the judge's folder: real.judge.checkpoint since real.judge became a section (kind, template, words)
JUDGE = "real.judge.checkpoint" if dataclasses.is_dataclass(RealConfig().judge) else "real.judge"


class Inputs(NamedTuple):
    root: pathlib.Path  # every prepared input lives here, outside the working directory
    good: pathlib.Path  # a tiny Llama folder with its tokenizer (defender, attacker and judge)

    def ckpt(self, name: str) -> str:
        return str(self.root / name)

    def file(self, name: str) -> str:
        return str(self.root / name)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("bad_input")
    (root / "hf").mkdir()
    good = _checkpoint(root / "hf", _word_tokenizer(reverse_words=False), seed=1)
    ins = Inputs(root, good)

    def variant(name: str) -> pathlib.Path:
        return pathlib.Path(shutil.copytree(good, root / name))

    def edit_config(folder: pathlib.Path, **changes):
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **changes}))

    (variant("no_config") / "config.json").unlink()
    edit_config(variant("gpt2"), architectures=["GPT2LMHeadModel"], model_type="gpt2")
    edit_config(variant("shapes"), intermediate_size=96)  # the safetensors say 64
    (variant("bad_json") / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    pickled = variant("pickle_only")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04\x95")  # a pickle's first bytes; never opened
    nan = variant("nan")
    tensors = load_file(str(nan / "model.safetensors"))
    w = tensors["model.layers.1.mlp.up_proj.weight"].copy()
    w[3, 5] = np.nan
    save_file({**tensors, "model.layers.1.mlp.up_proj.weight": w}, str(nan / "model.safetensors"),
              metadata={"format": "pt"})
    for name, special in (("eos_differs", "eos_token"), ("pad_differs", "pad_token")):
        folder = variant(name)
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, special: "<unk>"}))

    def text(name: str, content: str | bytes):
        f = root / name
        f.write_bytes(content if isinstance(content, bytes) else content.encode())

    text("seeds.txt", "\n".join(SEEDS) + "\n")  # 8 questions
    text("empty.txt", "")
    text("blank.txt", "\n  \n\t\n")
    text("latin1.txt", "\n".join(SEEDS[:2]).encode() + "\nWhat is a caf\xe9 ?\n".encode("latin-1"))
    text("over_context.txt", "\n".join(SEEDS[:4] + [" ".join(["lock"] * 600)] + SEEDS[4:]) + "\n")
    text("over_block.txt", "\n".join(SEEDS[:6] + [" ".join(["lock"] * 200)]) + "\n")
    text("duplicates.txt", "\n".join(SEEDS + [SEEDS[1], SEEDS[4]]) + "\n")
    text("bad.yaml", "runner: experiment\nconfig:\n  game: {batch_size: 4\n  loop: {total_steps: 2}\n")
    text("typo.yaml", "runner: experiment\nbase: default\nconfig:\n  gaem: {batch_size: 4}\n")
    # a run folder of another experiment (rlhf: defend-only on the seeds) with a checkpoint folder
    from alignjax import experiment

    other = root / "runs" / "rlhf" / "20250101-000000"
    (other / "checkpoints").mkdir(parents=True)
    (other / "config.yaml").write_text(dump_yaml(experiment.resolve(cli.load_experiment("rlhf")[1])))
    (root / "not_a_run" / "checkpoints").mkdir(parents=True)
    return ins


def real(ins: Inputs, *extra: str, defender: str = "", attacker: str = "", seeds: str = "seeds.txt"):
    """argv of the real setting on the tiny folders, with one input replaced."""
    good = str(ins.good)
    return [REAL, f"defender.checkpoint={defender or good}", f"attacker.checkpoint={attacker or good}",
            f"{JUDGE}={good}", f"real.seed_prompts={ins.file(seeds)}", "game.batch_size=4", *extra]


class Case(NamedTuple):
    id: str
    argv: Callable[[Inputs], list[str]]
    expect: str  # regex the output must match: it names the culprit
    subprocess: bool = False


def synthetic(*args: str) -> Callable[[Inputs], list[str]]:
    return lambda ins: ["default", *args]


SUBPROCESS = True
CASES = [
    # -- the config: YAML, keys, types, sizes
    Case("malformed_yaml_file", lambda ins: [ins.file("bad.yaml")],
         r"bad\.yaml: not valid YAML.*line \d+, column \d+", SUBPROCESS),
    Case("unknown_key_in_yaml_file", lambda ins: [ins.file("typo.yaml")], r"unknown key\(s\) \['gaem'\]"),
    Case("malformed_yaml_override", synthetic("game.batch_size=[4,"),
         r"override 'game\.batch_size=\[4,': the value is not valid YAML.*column"),
    Case("override_without_value", synthetic("game.batch_size"), r"'game\.batch_size' must look like"),
    Case("unknown_experiment", lambda ins: ["no_such_experiment"], r"no experiment 'no_such_experiment'"),
    Case("unknown_key_top", synthetic("sead=1"), r"config: unknown key\(s\) \['sead'\]"),
    Case("unknown_key_defender", synthetic("defender.chekpoint=x"),
         r"config\.defender: unknown key\(s\) \['chekpoint'\]", SUBPROCESS),
    Case("unknown_key_loop", synthetic("loop.steps=3"), r"config\.loop: unknown key\(s\) \['steps'\]"),
    Case("unknown_key_real", lambda ins: real(ins, "real.judge_path=x"),
         r"config\.real: unknown key\(s\) \['judge_path'\]"),
    Case("unknown_key_parallel", synthetic("parallel.devices=2"),
         r"config\.parallel: unknown key\(s\) \['devices'\]"),
    Case("unknown_key_nested_3", synthetic("game.schedule.n_defend=3"),
         r"config\.game\.schedule: unknown key\(s\) \['n_defend'\]"),
    Case("wrong_type_top", synthetic("seed=abc"), r"config\.seed: expected an int, got 'abc'"),
    Case("wrong_type_defender", synthetic("defender.policy_optimizer.learning_rate=fast"),
         r"config\.defender\.policy_optimizer\.learning_rate: expected a float, got 'fast'"),
    Case("wrong_type_loop", synthetic("loop.total_steps=1.5"), r"config\.loop\.total_steps: expected an int"),
    Case("wrong_type_real", lambda ins: real(ins, "real.max_prompt_tokens=many"),
         r"config\.real\.max_prompt_tokens: expected an int, got 'many'"),
    Case("wrong_type_parallel", synthetic("parallel.data=two"), r"config\.parallel\.data: expected an int"),
    Case("wrong_choice", synthetic("game.schedule.mode=sideways"),
         r"config\.game\.schedule\.mode: 'sideways' is not one of"),
    Case("section_given_a_scalar", synthetic("loop=5"), r"config\.loop: expected a mapping"),
    Case("scalar_given_a_section", synthetic("seed.value=1"), r"config\.seed: expected an int, got \{"),
    Case("option_of_another_setting", synthetic("eval.real_prompts=5"),
         r"setting 'synthetic' has no option\(s\) \['eval\.real_prompts'\]"),
    Case("zero_batch", synthetic("game.batch_size=0"), r"game\.batch_size must be >= 1, got 0"),
    Case("negative_batch", synthetic("game.batch_size=-4"), r"game\.batch_size must be >= 1, got -4"),
    Case("zero_steps", synthetic("loop.total_steps=0"), r"loop\.total_steps=0 \(must be >= 1\)"),
    Case("negative_steps", synthetic("loop.total_steps=-5"), r"total_steps >= 0 .* got -5"),
    Case("zero_chunk", synthetic("loop.chunk_size=0"), r"chunk_size >= 1, got \d+/0"),
    Case("zero_checkpoints_kept", synthetic("loop.max_to_keep=0"), r"loop\.max_to_keep=0 \(must be >= 1\)"),
    Case("negative_history", synthetic("game.history_capacity=-1"), r"game\.history_capacity must be >= 1"),
    Case("zero_new_tokens", synthetic("game.attacker_sampling.max_new_tokens=0"),
         r"game\.attacker_sampling\W+max_new_tokens\b.*\b0\b"),
    Case("zero_minibatches", synthetic("game.defender_ppo.num_minibatches=0"),
         r"game\.defender_ppo\W.*num_minibatches\b.*\b0\b"),
    Case("zero_embedding_length", synthetic("embedder.max_len=0"), r"embedder\.max_len=0 \(must be >= 1\)"),
    Case("zero_tensor_parallel", synthetic("parallel.tensor=0"), r"tensor >= 1, got .*tensor=0"),
    Case("zero_sft_batch", synthetic("world.sft_batch_size=0"), r"world\.sft_batch_size=0 \(must be >= 1\)"),
    Case("zero_prompt_tokens", lambda ins: real(ins, "real.max_prompt_tokens=0"),
         r"real\.max_prompt_tokens=0 \(must be >= 1\)"),
    Case("zero_eval_prompts", lambda ins: real(ins, "eval.real_prompts=0"),
         r"eval\.real_prompts=0 \(must be >= 1\)"),
    # -- the batch and the seed set
    Case("batch_over_synthetic_seed_set", synthetic("game.batch_size=1000"),
         r"game\.batch_size=1000 is larger than the world's seed set D \(176 prompts"),
    Case("batch_over_seed_file", lambda ins: real(ins, "game.batch_size=9"),
         r"game\.batch_size=9 is larger than the seed set: real\.seed_prompts='.*seeds\.txt' holds 8"),
    # -- seed prompt files
    Case("seed_file_missing", lambda ins: real(ins, seeds="nope.txt"), r"real\.seed_prompts='.*nope\.txt'"),
    Case("seed_file_empty", lambda ins: real(ins, seeds="empty.txt"), r"empty\.txt' is empty: no questions"),
    Case("seed_file_blank_lines", lambda ins: real(ins, seeds="blank.txt"),
         r"blank\.txt' holds only blank lines \(3 line\(s\)\)"),
    Case("seed_file_not_utf8", lambda ins: real(ins, seeds="latin1.txt"),
         r"latin1\.txt': not UTF-8 text: line 3 \(byte \d+"),
    Case("seed_line_over_context", lambda ins: real(ins, seeds="over_context.txt"),
         r"over_context\.txt': line 5 is 600 tokens, over 512 \(the players' context"),
    Case("seed_line_over_prompt_block", lambda ins: real(ins, seeds="over_block.txt"),
         r"over_block\.txt': line 7 is 200 tokens, over 128 \(real\.max_prompt_tokens=2048 / the prompt "
         r"block game\.attacker_sampling\.max_new_tokens=128"),
    # duplicates are a warning (counted), not an error: a NaN weight then stops the run while loading
    Case("seed_file_duplicates_warned",
         lambda ins: real(ins, defender=ins.ckpt("nan"), seeds="duplicates.txt"),
         r"(?s)warning: real\.seed_prompts='.*duplicates\.txt': 2 duplicate question\(s\) of 10 "
         r"\(first: line 9 repeats line 2\).*error: .*nan: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' "
         r"holds 1 NaN", SUBPROCESS),
    # -- checkpoint folders
    Case("checkpoint_missing", lambda ins: real(ins, defender=ins.ckpt("nope")),
         r"defender\.checkpoint='.*nope' does not exist"),
    Case("checkpoint_without_config_json", lambda ins: real(ins, attacker=ins.ckpt("no_config")),
         r"attacker\.checkpoint: .*no_config/config\.json not found"),
    Case("checkpoint_config_json_invalid", lambda ins: real(ins, attacker=ins.ckpt("bad_json")),
         r"attacker\.checkpoint: .*bad_json/config\.json: not valid JSON"),
    Case("checkpoint_unsupported_architecture", lambda ins: real(ins, defender=ins.ckpt("gpt2")),
         r"defender\.checkpoint: .*gpt2/config\.json: unsupported architecture \['GPT2LMHeadModel'\]"),
    Case("checkpoint_shapes_disagree_with_config", lambda ins: real(ins, defender=ins.ckpt("shapes")),
         r"defender\.checkpoint: .*shapes: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
         r"\(64, 32\), but config\.json implies \(96, 32\)"),
    Case("checkpoint_pickle_only", lambda ins: real(ins, defender=ins.ckpt("pickle_only")),
         r"defender\.checkpoint: .*pickle_only holds PyTorch pickle weights \['pytorch_model\.bin'\] and no "
         r"model\.safetensors: refused, since unpickling a file can run arbitrary code", SUBPROCESS),
    Case("nan_weight", lambda ins: real(ins, attacker=ins.ckpt("nan")),
         r"nan: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' holds 1 NaN/inf value\(s\) of 2048"),
    # -- the players' tokenizers
    Case("tokenizers_disagree_on_eos", lambda ins: real(ins, attacker=ins.ckpt("eos_differs")),
         r"disagree on the EOS id: 2 in defender\.checkpoint=.*; 3 in attacker\.checkpoint=.*eos_differs"),
    Case("tokenizers_disagree_on_pad", lambda ins: real(ins, attacker=ins.ckpt("pad_differs")),
         r"disagree on the PAD id: 0 in defender\.checkpoint=.*; 3 in attacker\.checkpoint=.*pad_differs"),
    # -- resume
    Case("resume_another_experiment", lambda ins: ["default", f"resume={ins.root}/runs/rlhf/20250101-000000"],
         r"resume='.*rlhf/20250101-000000': the config differs from that run's in \[.*'game\.prompt_source'"),
    Case("resume_not_a_run_folder", lambda ins: ["default", f"resume={ins.root}/not_a_run"],
         r"resume='.*not_a_run' is not a run folder: it has no config\.yaml"),
]


def _files(folder: pathlib.Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_rejected_by_name(case, inputs, tmp_path, monkeypatch, capfd):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the cli writes runs/NAME/<stamp>/ under the working directory
    monkeypatch.setenv("ALIGNJAX_CACHE_DIR", str(work / "cache"))  # the synthetic players' cache
    argv = case.argv(inputs)
    if case.subprocess:
        proc = subprocess.run([sys.executable, "-m", "alignjax.cli", *argv], cwd=work, capture_output=True,
                              text=True, timeout=300)
        code, out = proc.returncode, proc.stdout + proc.stderr
    else:
        code = cli.main(argv)
        got = capfd.readouterr()
        out = got.out + got.err
    assert code == EXIT, out
    assert "Traceback" not in out
    assert re.search(case.expect, out), out
    written = _files(work)
    assert all(re.fullmatch(r"runs/[\w.-]+/\d{8}-\d{6}/config\.yaml", f) for f in written), written
    assert len(written) <= 1, written


def test_checks_come_before_any_file_is_written_except_for_weights(inputs, tmp_path, monkeypatch, capfd):
    """Only a rejection found while reading tensors (the NaN) leaves the run folder's config.yaml; the
    header checks (shapes, pickle) and every config check leave nothing."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(real(inputs, defender=inputs.ckpt("shapes"))) == EXIT
    assert not _files(tmp_path)
    assert cli.main(real(inputs, defender=inputs.ckpt("nan"))) == EXIT
    (config,) = _files(tmp_path)
    assert config.startswith(f"runs/{REAL}/") and config.endswith("config.yaml")
    capfd.readouterr()


def test_the_good_inputs_pass_validation(inputs):
    """The unbroken fixtures pass every check (so each row fails for its own culprit only)."""
    from alignjax import experiment

    _, cfg = cli.load_experiment(REAL, real(inputs)[1:])
    experiment.validate(experiment.resolve(cfg))


def test_no_unsafe_loader_in_the_library():
    """Safe loading: no pickle, no torch.load, no remote code, YAML through safe_load only."""
    forbidden = re.compile(r"torch\.load\(|import (c?pickle|dill|joblib)\b|from (c?pickle|dill) import|"
                           r"pickle\.loads?\(|allow_pickle\s*=\s*True|trust_remote_code\s*=\s*True|"
                           r"yaml\.(load|unsafe_load|full_load)\(|Loader\s*=\s*yaml\.")
    hits = [f"{p.relative_to(REPO)}:{i}: {ln.strip()}" for p in sorted((REPO / "alignjax").rglob("*.py"))
            for i, ln in enumerate(p.read_text().splitlines(), 1) if forbidden.search(ln)]
    assert not hits, hits
