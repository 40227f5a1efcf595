"""ATTACK tests (outside red team, round 5) on restricted-party screening: spellings of listed parties that a
careful compliance officer flags and the matcher cleared, and the innocents next to them that must stay clear."""

from __future__ import annotations

from pathlib import Path

import pytest

from weightwarden.release.screen import ScreeningList

SAMPLE = Path(__file__).parents[2] / "src" / "weightwarden" / "release" / "lists" / "sample_csl.json"


@pytest.fixture(scope="module")
def sample() -> ScreeningList:
    return ScreeningList.load(SAMPLE)


def _ids(lst: ScreeningList, name: str) -> list[str]:
    return [h["entry"]["id"] for h in lst.screen(name)["hits"]]


def _id_of(lst: ScreeningList, listed: str) -> str:
    return next(e.id for e in lst.entries if e.name == listed)


@pytest.mark.parametrize(("name", "listed"), [
    # a hard c written k, as Russian and German transliterations write it (Каспийский: Kaspiy-)
    ("Kaspian Dual Use Logistics", "Caspian Dual-Use Logistics Ltd"),
    ("Kaspian Dual-Use Logistiks", "Caspian Dual-Use Logistics Ltd"),
    ("Korea Komputer Centre Branch 3", "Pyongyang Informatics Centre"),
])  # fmt: skip
def test_a_firm_with_a_hard_c_written_k_is_found(sample, name, listed):
    """ATTACK (evader): "Kaspian" for "Caspian": the string scores are above the threshold, but the word check
    (:func:`unmatched_words`) wanted the same first letter and knew no c / k spelling, so the firm was cleared."""
    assert _ids(sample, name) == [_id_of(sample, listed)]


@pytest.mark.parametrize(("name", "listed"), [
    ("Sergei Pertov", "Sergei Ivanovich Petrov"),
    ("Mohammed Al-Rahsidi", "Mohammed bin Abdullah Al-Rashidi"),
    ("Hassan Karmii", "Hassan Reza Karimi"),
])  # fmt: skip
def test_a_person_with_two_letters_swapped_in_the_family_name_is_found(sample, name, listed):
    """ATTACK (evader): a typing slip (two neighbouring letters swapped) in the family name, the given name in
    another listed spelling: the string scores fall under the threshold and the swapped word shared no key with
    the listed one, so the part-by-part check (which pairs swapped letters) was never asked.  Keyed by its letters
    in any order now."""
    assert _ids(sample, name) == [_id_of(sample, listed)]


@pytest.mark.parametrize(("name", "listed"), [
    ("TACRC Iran", "Tehran Advanced Computing Research Center"),
    ("TACRC, Iran", "Tehran Advanced Computing Research Center"),
    ("China ZPI", "Zhongxing Precision Instruments Co., Ltd."),
    ("HDLI China", "Harbin Deep Learning Institute"),
])  # fmt: skip
def test_a_listed_acronym_with_the_entrys_country_is_found(sample, name, listed):
    """ATTACK (evader): the acronym alone is a hit and so is "TACRC (Iran)" (a note in brackets is taken out), but
    the same country written without brackets, or after a comma, cleared the acronym (the branch and comma rules
    ask for a name of two words)."""
    assert _ids(sample, name) == [_id_of(sample, listed)]


@pytest.mark.parametrize("name", ["TACRC Iraq", "ZPI Germany", "Acme Iran", "ZPI CN", "Kaspi Logistics",
                                  "Kosmos Dual Use Logistics", "Cosmos Dual Use Logistics", "Korea Computer Company",
                                  "Hassan Kamiri", "Sergei Portev", "Sergei Petrenko", "Mohammed Al-Rashid",
                                  "Fatima Zahra Bennani", "Wang Xiaoping"])  # fmt: skip
def test_the_innocents_next_to_those_readings_stay_clear(sample, name):
    """The c / k spelling and the letters key find only what the word check and the part-by-part check accept:
    another word beginning with k, another family name with the same letters, stay clear."""
    assert _ids(sample, name) == []


@pytest.mark.parametrize(("name", "listed"), [
    ("Pjongjang lnfomatics Centre", "Pyongyang Informatics Centre"),
    ("Zhongxing Precision lnstrumets", "Zhongxing Precision Instruments Co., Ltd."),
])  # fmt: skip
def test_an_l_scanned_for_an_i_and_a_slip_besides_is_read_as_the_word(sample, name, listed):
    """ATTACK (evader): "lnformatics" (l for I) and "Infomatics" (a letter dropped) were each read as the firm's
    word, but both together were two edits from it and the name (its place an exonym besides) was cleared.  The
    l / I confusion is a look-alike, not the one slip allowed."""
    assert _ids(sample, name) == [_id_of(sample, listed)]
