"""Finding PHI values and path components in texts: both ways of looking give the same answer, in order."""

from __future__ import annotations

import random
import string

import pytest

from pipeline import privacy
from pipeline.privacy import Scrubber, _Needles


def _words(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice("abcde" + string.digits) for _ in range(rng.randint(1, 7))) for _ in range(count)]


@pytest.mark.parametrize("count", [3, 40, 4000])  # few needles: each searched; many: the text's substrings looked up
def test_found_in_equals_searching_each_needle_in_order(count: int) -> None:
    rng = random.Random(count)
    needles = _Needles()
    words = _words(rng, count)
    for word in words:
        needles.add(word)
    unique = list(dict.fromkeys(words))
    for text in ["", "a", *("".join(rng.choice("abcde0123x/._") for _ in range(rng.randint(1, 60)))
                            for _ in range(300))]:
        assert needles.found_in(text) == [w for w in unique if w in text]


def test_many_needles_are_not_each_searched_in_a_short_text() -> None:
    class Counting(str):
        searched = 0

        def __contains__(self, item: object) -> bool:
            Counting.searched += 1
            return super().__contains__(item)  # type: ignore[operator]

    needles = _Needles(f"value{i:05d}" for i in range(5000))
    assert needles.found_in(Counting("x/value00042/value04999.dcm")) == ["value00042", "value04999"]
    assert Counting.searched == 0  # the substrings were looked up instead


def _brute(self: _Needles, text: str) -> list[str]:
    return [needle for needle in self._rank if needle in text]


def test_a_scrubber_with_thousands_of_values_scrubs_like_one_that_searches_each(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    names = ["".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(3, 10))) for _ in range(3000)]
    values = {name: i % 5 == 0 for i, name in enumerate(names)} | {"Doe": False, "DOE": True, "19700101": False}
    rels = [f"{names[i]}_{names[i + 1].lower()}/series{i % 3}/IM{i:04d}.dcm" for i in range(0, 400, 2)]
    rels += ["plain/1.2.840.10008.5.1.4.1.1.4.dcm", "JaneDoe/1.3.6.1.4.1.9590.100.1.2.3.dcm", "doe/x19700101y"]
    messages = [f"{rel}: cannot be read; series of {names[5]} at {names[11].lower()}" for rel in rels[:50]]
    messages += ["DoeJane 19700101 and 119700101 complete", "nothing to see here"]

    fast = Scrubber(values, key="k")
    fast.paths(rels)
    expected_paths = [fast.path(r) for r in rels]
    expected_text = [fast.text(m) for m in messages]
    monkeypatch.setattr(privacy._Needles, "found_in", _brute)
    slow = Scrubber(values, key="k")
    slow.paths(rels)
    assert [slow.path(r) for r in rels] == expected_paths
    assert [slow.text(m) for m in messages] == expected_text
    assert expected_paths[0].startswith("phi-") and names[5] not in expected_text[0]
    assert "Doe" not in expected_text[-2] and expected_text[-2].endswith(" and 119700101 complete")  # whole words
