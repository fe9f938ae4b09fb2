"""The memory plan (`plan=true`, alignjax/plan.py) of a tiny real setting from config-only folders.

The players and the judge are 2-layer Llama configs (config.json + a word-level tokenizer, no weight
file). `plan=true` on a data 1 x fsdp 2 x tensor 2 mesh needs 4 devices; the test process has 8, so
the plan runs in its child process on 4 fake CPU devices, as it does from the CLI. Checked against
what the plan claims:

- per-device bytes of the trained parameters and of the frozen models equal a count from the configs
  alone (NumPy over the Llama parameter shapes: matrices / (fsdp x tensor), the critic's value head
  / fsdp, norms replicated; the judge split like a policy, the embedder replicated; references in the
  compute dtype);
  the compiled program's argument bytes equal the state + consts the plan counts;
- the peak is arguments + temporaries + outputs not aliased, and the fits table follows from it;
- no weight is read: the folders hold no safetensors file, and the abstract build, with safetensors'
  readers made to fail, gives the same state and consts shapes and dtypes as the build that loads a
  real checkpoint of those shapes;
- degrees that do not fit the model are rejected by the parallel layer's own error, from the child.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from alignjax import cli, plan
from alignjax import experiment as E
from alignjax.models import hf_io, llama
from alignjax.rewards.lm_judge import LLAMA_GUARD_TEMPLATE
from alignjax.settings.real import RealSetting
from alignjax.text.templates import ATTACKER_TEMPLATE, DEFENDER_TEMPLATE

SMALL = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
SEEDS = ["how do i pick a lock", "what chemicals are dangerous to mix", "write a story about a dragon",
         "how can i get into a car", "tell me how to bake bread", "explain how a vault is protected"]
CORPUS = SEEDS + [LLAMA_GUARD_TEMPLATE, DEFENDER_TEMPLATE, ATTACKER_TEMPLATE, "safe unsafe"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
MESH = ["parallel.mode=mesh", "parallel.data=1", "parallel.fsdp=2", "parallel.tensor=2"]
BUDGET = ["game.batch_size=4", "game.attacker_sampling.max_new_tokens=6",
          "game.defender_sampling.max_new_tokens=6", "game.history_capacity=16", "real.max_prompt_tokens=12",
          "real.long_seeds=truncate", "embedder.kind=bow", "embedder.dim=16"]  # fmt: skip


def _tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.add_special_tokens(SPECIALS)
    assert tok.get_vocab_size() < SMALL["vocab_size"]
    return tok


def _config_only(folder: pathlib.Path, tok: Tokenizer) -> pathlib.Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, **SMALL}))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    tok = _tokenizer()
    player, judge = _config_only(root / "player", tok), _config_only(root / "judge", tok)
    seeds = root / "seeds.txt"
    seeds.write_text("\n".join(SEEDS) + "\n")
    paths = [f"defender.checkpoint={player}", f"attacker.checkpoint={player}",
             f"real.judge.checkpoint={judge}", f"real.seed_prompts={seeds}"]
    return {"root": root, "paths": paths, "tok": tok}


def _cfg(inputs, *extra):
    return cli.load_experiment("real_llama7b_gpo_div", ["plan=true", *inputs["paths"], *BUDGET, *extra])[1]


def llama_bytes_per_device(c: dict, fsdp: int, tensor: int, itemsize: int, lm_head: bool = True) -> int:
    """Per-device bytes of Llama params from the config: every matrix split over fsdp x tensor (the
    sizes here divide), norms replicated."""
    v, d, f, n_layers = c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd = d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    matrices = [(v, d)] + [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)] * n_layers
    matrices += [(d, v)] if lm_head else []
    split = sum(np.prod(s, dtype=np.int64) for s in matrices) // (fsdp * tensor)
    norms = 2 * n_layers * d + d
    return int(split + norms) * itemsize


@pytest.fixture(scope="module")
def planned(inputs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = _cfg(inputs, *MESH)
    assert jax.device_count() != 4  # so the plan takes the child-process path
    return E.run(cfg, run_dir), run_dir


def test_plan_counts_match_the_configs_and_the_compiled_program(planned, inputs):
    p, run_dir = planned
    assert json.loads((run_dir / "plan.json").read_text()) == p
    assert p["layout"] == {"data": 1, "fsdp": 2, "tensor": 2, "devices": 4,
                           "describe": "mesh data 1 x fsdp 2 x tensor 2"}
    pd, cb = p["per_device_bytes"], p["compiled_bytes"]
    f32, bf16 = 4, 2
    policy = llama_bytes_per_device(SMALL, 2, 2, f32)
    critic = llama_bytes_per_device(SMALL, 2, 2, f32, lm_head=False) + (SMALL["hidden_size"] // 2 + 1) * f32
    assert pd["parameters"] == 2 * (policy + critic)
    # AdamW: two moments per trained weight in its sharding, plus replicated counters / hyperparameters
    assert 0 <= pd["optimizer"] - 2 * pd["parameters"] < 1024
    refs = 2 * llama_bytes_per_device(SMALL, 2, 2, bf16)  # compute dtype bf16 (the experiment's precision)
    judge = llama_bytes_per_device(SMALL, 2, 2, bf16)  # a const, split by the same rules as a policy
    bow = inputs["tok"].get_vocab_size() * 16 * f32
    assert pd["frozen"] == refs + judge + bow
    assert pd["state_and_consts"] == pd["parameters"] + pd["optimizer"] + pd["frozen"] + pd["other"]
    assert cb["arguments"] == pd["state_and_consts"]  # XLA's count of the per-device inputs agrees
    assert 0 < cb["aliased"] <= cb["outputs"] and cb["temporaries"] > 0
    assert p["peak_bytes"] == cb["arguments"] + cb["temporaries"] + cb["outputs"] - cb["aliased"]
    assert [r["accelerator"] for r in p["fits"]] == ["TPU v5e", "TPU v4", "H100", "TPU v5p", "H200"]
    for r in p["fits"]:
        assert r["fits"] == (p["peak_bytes"] <= r["gb"] * 1e9)
        assert r["fraction"] == pytest.approx(p["peak_bytes"] / (r["gb"] * 1e9))
    md = (run_dir / "plan.md").read_text()
    assert md.startswith("# Memory plan: real setting, mesh data 1 x fsdp 2 x tensor 2 (4 devices)")
    peak_row = f"| **peak estimate** = arguments + temporaries + outputs not aliased | {p['peak_bytes']:,} |"
    assert peak_row in md
    assert "| H200 | 141 GB |" in md


def test_fits_table_follows_the_peak():
    rows = {r["accelerator"]: r["fits"] for r in plan.fits(int(20e9))}
    assert rows == {"TPU v5e": False, "TPU v4": True, "H100": True, "TPU v5p": True, "H200": True}
    assert [r["fits"] for r in plan.fits(int(141e9) + 1)] == [False] * 5
    assert plan.fits(int(16e9))[0]["fits"]  # exactly full still fits


def test_abstract_build_reads_no_weights_and_matches_the_loaded_build(inputs, tmp_path, monkeypatch):
    """The config-only folders would fail a loader; with a real checkpoint of the same shapes in the
    folders, the abstract build still opens no safetensors file and gives the loaded build's shapes."""
    assert not list(inputs["root"].rglob("*.safetensors"))
    config, _, _ = hf_io.read_config(inputs["root"] / "player")
    real = hf_io.save_pretrained(llama.init_params(config, jax.random.PRNGKey(1)), config, tmp_path / "real")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(inputs["root"] / "player" / name, real / name)
    paths = [f"defender.checkpoint={real}", f"attacker.checkpoint={real}", f"real.judge.checkpoint={real}"]
    cfg = E.resolve(_cfg(inputs, *paths))
    loaded = RealSetting().build(cfg, axis_name=None)

    import safetensors
    import safetensors.numpy

    def refuse(*args, **kwargs):
        raise AssertionError(f"a safetensors file was read: {args}")

    for module, name in ((safetensors, "safe_open"), (safetensors.numpy, "load_file")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr("alignjax.models.hf_io.safe_open", refuse)
    built = RealSetting().build(cfg, axis_name=None, weights="abstract")
    for tree in (built.state, built.consts):
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))
    shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)
    assert shapes(built.state) == shapes(loaded.state)
    assert shapes(built.consts) == shapes(loaded.consts)
    assert built.spec.defender.models == loaded.spec.defender.models


def test_degrees_that_do_not_fit_the_model_are_rejected_by_the_layout_checks(inputs, tmp_path):
    # tensor 3 -> 3 devices (a child process); the parallel layer's own message comes back
    with pytest.raises(ValueError, match="parallel.tensor=3 does not divide the defender's num_heads=4"):
        E.run(_cfg(inputs, "parallel.mode=mesh", "parallel.data=1", "parallel.fsdp=1", "parallel.tensor=3"),
              tmp_path)
    with pytest.raises(ValueError, match="plan=true needs the device count"):
        E.run(_cfg(inputs, "parallel.mode=mesh", "parallel.data=1", "parallel.fsdp=0"), tmp_path)
    with pytest.raises(ValueError, match="set parallel.mode=mesh"):
        E.run(_cfg(inputs, "parallel.mode=pmap"), tmp_path)


def test_readme_plan_table_is_the_committed_collect_output():
    """The README's 7B memory table is `results/plan_7b.md` (written by `python -m alignjax.plan
    --collect`) rendered by tools/readme_results.py, never typed in."""
    import importlib.util
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("readme_results", root / "tools" / "readme_results.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    table = tool.plan_table((root / "results" / "plan_7b.md").read_text())
    assert table.count("\n") >= 5 and "real: mesh data 1 x fsdp 16" in table
    readme = (root / "README.md").read_text()
    assert tool.fill(readme, "plan_7b", table) == readme
