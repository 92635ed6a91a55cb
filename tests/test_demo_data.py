"""The demo data generator: determinism, the shipped file, and answers checked by independent code.

The checks below re-derive answers from the row text with their own parsing and tables, so a bug in a
generator function cannot also hide itself in the test.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ftkit import demo_data as gd

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "data" / "generate_demo_data.py"
SHIPPED = REPO / "data" / "demo_tasks.jsonl"

# The command line is a script in data/ (not a package): loaded by path for its main().
_spec = importlib.util.spec_from_file_location("generate_demo_data", SCRIPT)
cli = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cli
_spec.loader.exec_module(cli)

SMALL = 40  # rows per family for the fast checks


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return gd.generate(0, gd.DEFAULT_PER_FAMILY)


def by_family(rows: list[dict], family: str) -> list[dict]:
    got = [r for r in rows if r["family"] == family]
    assert got, f"no rows of family {family}"
    return got


# -- determinism and the shipped file ---------------------------------------------------------------
def test_same_seed_same_rows():
    assert gd.generate(3, SMALL) == gd.generate(3, SMALL)


def test_different_seed_different_rows():
    a, b = gd.generate(0, SMALL), gd.generate(1, SMALL)
    verifiable = lambda rs: [(r["instruction"], r["input"]) for r in rs if r["verifiable"]]
    assert verifiable(a) != verifiable(b)
    assert len(set(verifiable(a)) & set(verifiable(b))) < len(verifiable(a)) // 2


def test_shipped_file_is_the_default_output(tmp_path):
    # Run the real CLI in a fresh interpreter: also catches anything that depends on hash seeds or the
    # working directory.
    out = tmp_path / "tasks.jsonl"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == SHIPPED.read_bytes(), (
        "data/demo_tasks.jsonl is stale; run: python data/generate_demo_data.py"
    )
    for family in gd.FAMILIES:
        assert family in res.stdout
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"


def test_cli_seed_and_per_family(tmp_path):
    out = tmp_path / "small.jsonl"
    assert cli.main(["--seed", "5", "--per-family", "7", "--out", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == gd.generate(5, 7)
    assert out.read_text(encoding="utf-8") == gd.to_jsonl(gd.generate(5, 7))


def test_impossible_per_family_is_an_error(tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    assert cli.main(["--per-family", "5000", "--out", str(out)]) == 2
    assert "lower --per-family" in capsys.readouterr().err
    assert not out.exists()


# -- shape -------------------------------------------------------------------------------------------
def test_counts_and_fields(rows):
    counts = Counter(r["family"] for r in rows)
    assert set(counts) == set(gd.FAMILIES)
    for family in gd.VERIFIABLE_FAMILIES:
        assert counts[family] == gd.DEFAULT_PER_FAMILY
    assert 60 <= counts["open_ended"] <= 100
    for r in rows:
        assert list(r) == ["instruction", "input", "output", "family", "verifiable"]
        assert isinstance(r["instruction"], str) and r["instruction"].strip()
        assert isinstance(r["output"], str) and r["output"].strip()
        assert isinstance(r["input"], str)
        assert r["verifiable"] is (r["family"] != "open_ended")
        # Outputs are stored as the canonical answer: the loader's strip() must not change them.
        assert r["output"] == r["output"].strip() and r["instruction"] == r["instruction"].strip()


def test_no_duplicate_prompts(rows):
    keys = [(r["instruction"], r["input"]) for r in rows]
    assert len(keys) == len(set(keys))


def test_with_and_without_input(rows):
    assert any(r["input"] for r in rows) and any(not r["input"] for r in rows)
    fams_with = {r["family"] for r in rows if r["input"] and r["verifiable"]}
    fams_without = {r["family"] for r in rows if not r["input"] and r["verifiable"]}
    assert fams_with and fams_without


def test_verifiable_answers_are_short(rows):
    # Answer-only outputs are what make exact match meaningful; a sentence would be a bug.
    for r in rows:
        if r["verifiable"]:
            assert len(r["output"]) <= 40 and "\n" not in r["output"], r


def test_families_are_interleaved(rows):
    assert len({r["family"] for r in rows[:100]}) == len(gd.FAMILIES)


# -- answers, re-derived -----------------------------------------------------------------------------
def test_arithmetic(rows):
    for r in by_family(rows, "arithmetic"):
        text = r["instruction"]
        a, b = map(int, re.findall(r"\d+", text))
        if re.search(r"\+|plus|\badd\b", text, re.I):
            want = a + b  # "Add 3 to 56" and "56 + 3" both: order does not matter
        elif m := re.fullmatch(r"Subtract (\d+) from (\d+)\.", text):
            want = int(m[2]) - int(m[1])
        else:
            assert re.search(r" - |minus", text), text
            want = a - b
        assert r["output"] == str(want), r
        assert want >= 0


def test_unit_conversion(rows):
    factor = {
        ("kilometer", "meters"): 1000,
        ("meter", "centimeters"): 100,
        ("centimeter", "millimeters"): 10,
        ("kilogram", "grams"): 1000,
        ("liter", "milliliters"): 1000,
        ("dollar", "cents"): 100,
        ("decade", "years"): 10,
        ("centur", "years"): 100,
    }
    for r in by_family(rows, "unit_conversion"):
        m = re.search(r"(\d+) (kilometer|centimeter|meter|kilogram|liter|dollar|decade|centur)\w*", r["instruction"])
        to = re.search(
            r"\b(meters|centimeters|millimeters|grams|milliliters|cents|years)\b", r["instruction"].replace(m[0], "")
        )
        assert m and to, r
        assert r["output"] == str(int(m[1]) * factor[(m[2], to[1])]), r


def test_sort_numbers(rows):
    for r in by_family(rows, "sort_numbers"):
        nums = [int(x) for x in r["input"].split(",")]
        assert 3 <= len(nums) <= 5 and len(set(nums)) == len(nums)
        assert r["output"] == ", ".join(str(n) for n in sorted(nums)), r


def test_word_ops(rows):
    count = {"two": 2, "three": 3, "four": 4, "2": 2, "3": 3, "4": 4}
    for r in by_family(rows, "word_ops"):
        text = r["instruction"]
        if "first letter" in text or "start with" in text:
            word = re.search(r'"(\w+)"', text)[1]
            assert r["output"] == word[:1], r
        elif "times" in text:
            m = re.search(r'"(\w+)" (\w+) times', text)
            assert r["output"] == " ".join([m[1]] * count[m[2]]), r
        else:
            assert "hyphen" in text and r["input"], r
            assert r["output"] == r["input"].replace(" ", "-"), r


def test_date_arithmetic(rows):
    days = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
    for r in by_family(rows, "date_arithmetic"):
        text = r["instruction"]
        iso = re.search(r"\d{4}-\d{2}-\d{2}", text)
        if iso and "month" in text:
            assert r["output"] == dt.date.fromisoformat(iso[0]).strftime("%B"), r
        elif iso:
            n = int(re.search(r"(\d+) days?\b", text)[1])
            assert r["output"] == (dt.date.fromisoformat(iso[0]) + dt.timedelta(days=n)).isoformat(), r
        else:
            n = int(re.search(r"(\d+) days?\b", text)[1])
            start = next(d for d in days if d in text.lower())
            assert r["output"].lower() == days[(days.index(start) + n) % 7], r


def test_extraction(rows):
    email = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
    for r in by_family(rows, "extraction"):
        text, inp, out = r["instruction"].lower(), r["input"], r["output"]
        assert inp.count(out) == 1, r  # present, and only once
        if "email" in text:
            found = [m[0] for m in email.finditer(inp)]
            assert found == [out], r
        elif "number" in text:
            assert re.findall(r"\d+", inp) == [out], r
        elif "city" in text:
            assert out in gd.CITIES, r
        else:
            first, last = out.split(" ")
            assert first in gd.FIRST_NAMES and last in gd.LAST_NAMES, r
            assert not re.search(r"\d|@", inp)


def test_every_family_is_checked_above():
    checked = {"arithmetic", "unit_conversion", "sort_numbers", "word_ops", "date_arithmetic", "extraction"}
    assert set(gd.VERIFIABLE_FAMILIES) == checked, "a new family needs its own answer check here"


# -- scoring helper ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pred, gold",
    [
        ("42", "42"),
        (" 42. ", "42"),
        ("Paris.", "paris"),
        ("New   Delhi", "new delhi"),
        ("2024-03-15\n", "2024-03-15"),
        ("Tuesday.", "tuesday"),
        ("A.B.", "a.b"),
    ],
)
def test_normalize_answer_matches(pred, gold):
    assert gd.normalize_answer(pred) == gd.normalize_answer(gold)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("The answer is 42.", "42"),
        ("4 2", "42"),
        ("42,", "42"),
        ("7, 19", "7,19"),
    ],
)
def test_normalize_answer_keeps_differences(pred, gold):
    assert gd.normalize_answer(pred) != gd.normalize_answer(gold)


def test_open_ended_rows_are_literal_and_unscored(rows):
    open_rows = by_family(rows, "open_ended")
    assert {(r["instruction"], r["input"], r["output"]) for r in open_rows} == set(gd.OPEN_ENDED)
    assert not any(r["verifiable"] for r in open_rows)


# -- the multi-turn section --------------------------------------------------------------------------
SHIPPED_CONVERSATIONS = REPO / "data" / "demo_conversations.jsonl"


def expected_last_answer(conv: list[dict]) -> str:
    """The last answer, re-derived from the user turns' text alone."""
    users = [m["content"] for m in conv if m["role"] == "user"]
    if m := re.fullmatch(r"Remember this word: (\w+)\.", users[0]):
        return m.group(1)
    if m := re.fullmatch(r"Start a running total at (\d+)\.", users[0]):
        total = int(m.group(1))
        for u in users[1:-1]:
            op, n = re.fullmatch(r"(Add|Subtract) (\d+)\.", u).groups()
            total += int(n) if op == "Add" else -int(n)
        return str(total)
    name, city = re.fullmatch(r"Hi, I am (\w+) and I live in ([\w ]+)\.", users[0]).groups()
    return {
        "What is the first letter of my name?": name[0],
        "Which city do I live in?": city,
        "What is my name?": name,
    }[users[-1]]


def test_conversations_depend_on_an_earlier_turn_and_are_right():
    rows = gd.generate_conversations(0, 60)
    assert rows == gd.generate_conversations(0, 60) and rows != gd.generate_conversations(1, 60)
    assert Counter(r["family"] for r in rows) == {f: 60 for f in gd.CONVERSATION_FAMILIES}
    assert len({json.dumps(r["messages"]) for r in rows}) == len(rows)
    for r in rows:
        conv = r["messages"]
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2) and len(conv) >= 6
        assert conv[-1]["content"] == expected_last_answer(conv), conv
        # The answer is not in the turn just before it: the model must look further back.
        assert conv[-1]["content"] not in conv[-2]["content"] and r["verifiable"] is True


def test_shipped_conversations_are_the_default_output(tmp_path):
    out = tmp_path / "c.jsonl"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--conversations", "--out", str(out)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == SHIPPED_CONVERSATIONS.read_bytes(), (
        "data/demo_conversations.jsonl is stale; run: python data/generate_demo_data.py --conversations"
    )
    assert "recall_word" in res.stdout


# -- the preference demo's pairs (ftkit/demo_pairs.py) ---------------------------------------------------------
def test_shipped_pairs_are_the_default_output(tmp_path, rows):
    from ftkit import demo_pairs

    out = tmp_path / "pairs.jsonl"
    assert cli.main(["--pairs", "--out", str(out)]) == 0
    assert out.read_bytes() == demo_pairs.DEFAULT_PAIRS_OUT.read_bytes()
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert Counter(p["family"] for p in pairs) == {
        f: demo_pairs.DEFAULT_PAIRS_PER_FAMILY for f in gd.VERIFIABLE_FAMILIES
    }
    # every rejected answer is wrong, and the chosen one is the task's own answer
    answers = {(r["instruction"], r["input"]): r["output"] for r in rows}
    for p in pairs:
        assert p["chosen"] == answers[p["instruction"], p["input"]]
        assert gd.normalize_answer(p["rejected"]) != gd.normalize_answer(p["chosen"]) and p["rejected"].strip()


def test_pairs_take_the_base_models_wrong_answer_and_only_a_wrong_one(rows):
    from ftkit.demo_pairs import generate_pairs

    ver = [r for r in rows if r["verifiable"]][:3]
    base = {
        (ver[0]["instruction"], ver[0]["input"]): "something else",
        (ver[1]["instruction"], ver[1]["input"]): f" {ver[1]['output'].upper()}. ",  # right, after normalization
    }
    pairs = generate_pairs(ver, base_answers=base)
    assert [p["rejected_from"] for p in pairs] == ["base", "corrupted", "corrupted"]
    assert pairs[0]["rejected"] == "something else"
    assert gd.normalize_answer(pairs[1]["rejected"]) != gd.normalize_answer(ver[1]["output"])
