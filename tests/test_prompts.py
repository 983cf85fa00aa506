"""Tests for cosmic_bake.prompts: every file format, the built-in sets, and every bad input."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.prompts.sets import BUILTIN_SETS, builtin_path, load_prompts, require_count, split_holdout

PROMPTS = ["Write a haiku about rain.", "Explain recursion.", "How do I boil an egg?"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def raises(match: str):
    return pytest.raises(CosmicBakeError, match=match)


def write_parquet(path: Path, columns: dict[str, list[str]]) -> Path:
    """Parquet needs the optional pandas + pyarrow; skip rather than fail without them."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in columns.items()}).to_parquet(path)
    return path


# --- formats ------------------------------------------------------------------------------


def test_json_list_of_strings(tmp_path: Path) -> None:
    path = write(tmp_path / "p.json", json.dumps(PROMPTS))
    assert load_prompts(path) == PROMPTS
    assert load_prompts(str(path)) == PROMPTS


def test_json_list_of_objects_uses_default_column(tmp_path: Path) -> None:
    rows = [{"id": i, "goal": p} for i, p in enumerate(PROMPTS)]
    assert load_prompts(write(tmp_path / "p.json", json.dumps(rows))) == PROMPTS


def test_default_column_order_prefers_instruction(tmp_path: Path) -> None:
    rows = [{"text": "ignored", "instruction": p} for p in PROMPTS]
    assert load_prompts(write(tmp_path / "p.json", json.dumps(rows))) == PROMPTS


def test_jsonl_objects_and_strings_skip_blank_lines(tmp_path: Path) -> None:
    lines = [json.dumps({"prompt": PROMPTS[0]}), "", json.dumps({"prompt": PROMPTS[1]})]
    assert load_prompts(write(tmp_path / "p.jsonl", "\n".join(lines) + "\n")) == PROMPTS[:2]
    strings = "\n".join(json.dumps(p) for p in PROMPTS)
    assert load_prompts(write(tmp_path / "s.jsonl", strings)) == PROMPTS


def test_csv(tmp_path: Path) -> None:
    # quoted cells with commas and quotes, as spreadsheets write them
    rows = ["question,label", *(f'"{p.replace(chr(34), 2 * chr(34))}",1' for p in PROMPTS)]
    assert load_prompts(write(tmp_path / "p.csv", "\n".join(rows) + "\n")) == PROMPTS
    assert load_prompts(write(tmp_path / "q.csv", 'prompt\n"Say ""hi"", then stop."\n')) == ['Say "hi", then stop.']


def test_txt_one_prompt_per_nonempty_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p.txt", "\n".join([PROMPTS[0], "", "   ", *PROMPTS[1:]]) + "\n")
    assert load_prompts(path) == PROMPTS


def test_parquet(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "p.parquet", {"behavior": PROMPTS, "category": ["a", "b", "c"]})
    assert load_prompts(path) == PROMPTS


def test_column_option_picks_named_column(tmp_path: Path) -> None:
    rows = [{"instruction": "wrong", "my_prompt": p} for p in PROMPTS]
    assert load_prompts(write(tmp_path / "p.json", json.dumps(rows)), "my_prompt") == PROMPTS
    path = write_parquet(tmp_path / "p.parquet", {"prompt": ["x"] * 3, "alt": PROMPTS})
    assert load_prompts(path, column="alt") == PROMPTS


def test_entries_are_stripped_and_limit_keeps_first(tmp_path: Path) -> None:
    path = write(tmp_path / "p.json", json.dumps(["  a  ", "b\n", "c"]))
    assert load_prompts(path) == ["a", "b", "c"]
    assert load_prompts(path, limit=2) == ["a", "b"]
    assert load_prompts(path, limit=10) == ["a", "b", "c"]


# --- built-in sets ------------------------------------------------------------------------


def test_builtin_sets_load_and_are_well_formed() -> None:
    loaded = {name: load_prompts(f"builtin:{name}") for name in BUILTIN_SETS}
    for name, prompts in loaded.items():
        assert len(prompts) >= 128, name
        assert len({p.lower() for p in prompts}) == len(prompts), f"duplicates in {name}"
        rows = json.loads(builtin_path(name).read_text(encoding="utf-8"))
        categories = Counter(row["category"] for row in rows)
        assert len(categories) >= 10, name
        assert max(categories.values()) - min(categories.values()) <= 2, f"{name} unbalanced"
        # interleaved: the first 10 prompts should not all come from one category
        assert len({row["category"] for row in rows[:10]}) >= 5, name
    assert not set(loaded["harmful"]) & set(loaded["harmless"])


def test_builtin_limit() -> None:
    assert load_prompts("builtin:harmless", limit=5) == load_prompts("builtin:harmless")[:5]


def test_unknown_builtin() -> None:
    with raises(r"unknown built-in prompt set 'nope'.*builtin:harmful"):
        load_prompts("builtin:nope")


# --- bad inputs ---------------------------------------------------------------------------


def test_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with raises(r"prompt file .*missing\.json not found; check the path"):
        load_prompts(missing)
    # looks like owner/name but has a prompt-file extension: a path, not a Hub id
    with raises(r"prompt file data/nothing_here\.csv not found"):
        load_prompts("data/nothing_here.csv")
    with raises(r"prompt file nothing_here not found"):
        load_prompts("nothing_here")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with raises(r"is a directory"):
        load_prompts(tmp_path)


def test_unknown_extension(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", "- a\n")
    with raises(r"p\.yaml: unsupported prompt file type '\.yaml'; use one of \.json, \.jsonl"):
        load_prompts(path)


def test_malformed_json(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.json", '[\n  "a",\n  "b"\n')
    with raises(r"bad\.json: malformed JSON at line \d+ column \d+"):
        load_prompts(path)


def test_json_top_level_must_be_list(tmp_path: Path) -> None:
    with raises(r"expected a JSON list, got dict"):
        load_prompts(write(tmp_path / "p.json", '{"prompts": ["a"]}'))


def test_malformed_jsonl_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"\n')
    with raises(r"bad\.jsonl: malformed JSON on line 3"):
        load_prompts(path)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("empty.json", "[]"),
        ("empty.jsonl", "\n\n"),
        ("empty.txt", "  \n\n"),
        ("empty.csv", "prompt\n"),
    ],
)
def test_empty_set(tmp_path: Path, name: str, text: str) -> None:
    with raises(rf"{name} contains no prompts; add at least one prompt"):
        load_prompts(write(tmp_path / name, text))


def test_empty_parquet(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "empty.parquet", {"prompt": []})
    with raises(r"empty\.parquet contains no prompts"):
        load_prompts(path)


def test_non_string_entry_names_index(tmp_path: Path) -> None:
    with raises(r"p\.json: index 1 is of type int, not a string"):
        load_prompts(write(tmp_path / "p.json", '["a", 3, "c"]'))
    rows = json.dumps([{"prompt": "a"}, {"prompt": None}])
    with raises(r"p2\.json: index 1 'prompt' is missing, not a string"):
        load_prompts(write(tmp_path / "p2.json", rows))


def test_blank_entry_names_index_or_line(tmp_path: Path) -> None:
    with raises(r"p\.json: index 2 is empty or whitespace only"):
        load_prompts(write(tmp_path / "p.json", '["a", "b", "   "]'))
    with raises(r"p\.jsonl: line 2 'prompt' is empty or whitespace only"):
        load_prompts(write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"prompt": ""}\n'))
    with raises(r"p\.csv: line 3 'prompt' is empty or whitespace only"):
        load_prompts(write(tmp_path / "p.csv", "prompt,label\nhello,1\n,0\n"))


def test_mixed_strings_and_objects(tmp_path: Path) -> None:
    with raises(r"index 1 is of type str, but other entries are objects"):
        load_prompts(write(tmp_path / "p.json", '[{"prompt": "a"}, "b"]'))


def test_named_column_missing_lists_available(tmp_path: Path) -> None:
    rows = json.dumps([{"prompt": "a", "label": 1}])
    with raises(r"no column 'query'; available columns: 'prompt', 'label'"):
        load_prompts(write(tmp_path / "p.json", rows), "query")
    path = write_parquet(tmp_path / "p.parquet", {"body": ["a"]})
    with raises(r"p\.parquet: no column 'prompt'; available columns: 'body'"):
        load_prompts(path, column="prompt")


def test_no_default_column_lists_available(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", "body,label\nhello,1\n")
    with raises(r"none of the usual prompt columns .* available columns: 'body', 'label'; name"):
        load_prompts(path)


def test_row_missing_chosen_field(tmp_path: Path) -> None:
    rows = json.dumps([{"prompt": "a"}, {"text": "b"}])
    with raises(r"index 1 has no 'prompt' field"):
        load_prompts(write(tmp_path / "p.json", rows))


def test_column_on_plain_strings(tmp_path: Path) -> None:
    with raises(r"column 'prompt' given, but the file holds plain strings"):
        load_prompts(write(tmp_path / "p.txt", "a\nb\n"), "prompt")


def test_bad_limit_and_split_on_local_file(tmp_path: Path) -> None:
    path = write(tmp_path / "p.txt", "a\nb\n")
    with raises(r"limit must be a positive integer, got 0"):
        load_prompts(path, limit=0)
    with raises(r"split='test' only applies to Hub datasets"):
        load_prompts(path, split="test")


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"ok\n\xff\xfe bad\n")
    with raises(r"p\.txt is not valid UTF-8"):
        load_prompts(path)


def test_hub_conflicting_split_is_rejected_before_any_download() -> None:
    with raises(r"split 'train' in the id disagrees with split='test'"):
        load_prompts("owner/name:train", split="test")


def test_hub_without_datasets_package_says_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with raises(r"owner/name is not a local file.*'datasets' package; pip install datasets"):
        load_prompts("owner/name")


def test_hub_path_with_stub_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercise the Hub branch offline with a stand-in for ``datasets.load_dataset``."""
    calls: list[tuple[str, str]] = []

    class Stub:
        column_names = ("id", "goal")

        def __getitem__(self, column: str) -> list[str]:
            return {"id": ["1", "2", "3"], "goal": PROMPTS}[column]

    def load_dataset(name: str, split: str) -> Stub:
        if name == "owner/broken":
            raise ConnectionError("offline\nno route")
        calls.append((name, split))
        return Stub()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_prompts("owner/name") == PROMPTS
    assert load_prompts("owner/name:test", limit=2) == PROMPTS[:2]
    assert load_prompts("owner/name", "id", split="validation") == ["1", "2", "3"]
    assert calls == [("owner/name", "train"), ("owner/name", "test"), ("owner/name", "validation")]
    with raises(r"Hub dataset owner/name \(split train\): no column 'nope'; available columns: 'id'"):
        load_prompts("owner/name", "nope")
    with raises(r"could not load Hub dataset owner/broken \(split train\) \(offline no route\)"):
        load_prompts("owner/broken")


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(CosmicBakeError) as info:
        load_prompts(write(tmp_path / "bad.jsonl", '{"a": 1}\n{oops}\n'))
    assert "\n" not in str(info.value)


# --- split_holdout / require_count --------------------------------------------------------


def test_split_holdout_keeps_order_and_is_deterministic() -> None:
    prompts = [f"p{i}" for i in range(20)]
    train, val = split_holdout(prompts)
    assert train == prompts[:16] and val == prompts[16:]
    assert split_holdout(prompts) == (train, val)


def test_split_holdout_respects_min_val() -> None:
    prompts = [f"p{i}" for i in range(10)]
    train, val = split_holdout(prompts, 0.1, min_val=4)
    assert len(val) == 4 and train + val == prompts


def test_split_holdout_too_few() -> None:
    with raises(r"only 7 prompts: too few to hold out 20% .*need at least 8.*separate validation set"):
        split_holdout([f"p{i}" for i in range(7)])
    assert [len(part) for part in split_holdout([f"p{i}" for i in range(8)])] == [4, 4]


def test_split_holdout_bad_fraction() -> None:
    with raises(r"fraction must be between 0 and 1, got 1.5"):
        split_holdout(["a"] * 20, 1.5)


def test_require_count() -> None:
    require_count(["a", "b"], 2, "harmful train set")
    with raises(r"harmful train set has 2 prompts but at least 5 are needed"):
        require_count(["a", "b"], 5, "harmful train set")


def test_parquet_without_pandas_says_pip_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "p.parquet", "not really parquet")
    monkeypatch.setitem(sys.modules, "pandas", None)
    with raises(r"p\.parquet: reading parquet needs pandas and pyarrow; pip install pandas pyarrow"):
        load_prompts(path)


def test_corrupt_parquet(tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    with raises(r"bad\.parquet: cannot read parquet file"):
        load_prompts(write(tmp_path / "bad.parquet", "not really parquet"))


SHARED = Path(__file__).resolve().parents[2] / "shared"


def test_default_sizes_keep_small_files_whole_and_sample_large_ones() -> None:
    """Issue 16: files at or under 128 train / 32 val prompts are used whole and in order (the
    built-in sets, the reference case); larger ones are sampled, seeded, in file order."""
    from cosmic_bake.prompts.sets import DEFAULT_TRAIN, DEFAULT_VAL, prompt_sets

    builtin = prompt_sets()
    assert builtin == prompt_sets(limit="all", limit_val="all")
    assert [len(v) for v in builtin.values()] == [128, 128, 16, 16]
    assert all(info["how"] == "all" for info in builtin.sampling.values())

    ref = SHARED / "reference" / "cosmic-qwen2.5-coder-0.5b-lce"
    data = SHARED / "data"
    if not (ref.is_dir() and data.is_dir()):
        pytest.skip("../shared is not beside the project")
    names = ("harmful_train", "harmless_train", "harmful_val", "harmless_val")
    files = [str(ref / f"{n}.json") for n in names]
    assert list(prompt_sets(*files).values()) == [load_prompts(f) for f in files]  # the reference case, as is

    files = [str(data / f"{n}.json") for n in names]  # 260, 2000, 39, 500 prompts
    sets = prompt_sets(*files)
    assert [len(v) for v in sets.values()] == [DEFAULT_TRAIN, DEFAULT_TRAIN, DEFAULT_VAL, DEFAULT_VAL]
    for (name, kept), f in zip(sets.items(), files):
        whole = load_prompts(f)
        where = [whole.index(p) for p in kept]
        assert where == sorted(where) and len(set(where)) == len(kept), name  # a subset, in file order
        assert sets.sampling[name] == {"from": len(whole), "kept": len(kept), "how": "sample", "seed": 42}
    assert prompt_sets(*files) == sets  # seeded
    assert prompt_sets(*files, seed=7)["harmless train"] != sets["harmless train"]
    first = prompt_sets(*files, limit=10, limit_val=3)
    assert first["harmless train"] == load_prompts(files[1])[:10] and first["harmful val"] == load_prompts(files[2])[:3]
    assert len(prompt_sets(*files, limit="all")["harmless train"]) == 2000
