"""Restricted-party screening (issue 7): recall and precision on hand-written name variants of the
shipped sample list, the three list formats, bad lists failing closed, and the CLI."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.cli import warden
from weightwarden.release.screen import ScreeningError, ScreeningList, normalize

ROOT = Path(__file__).parents[2]
SAMPLE = ROOT / "src" / "weightwarden" / "release" / "lists" / "sample_csl.json"
VARIANTS = json.loads((Path(__file__).parents[1] / "vectors" / "screening_variants.json").read_text())


@pytest.fixture(scope="module")
def sample() -> ScreeningList:
    return ScreeningList.load(SAMPLE)


def test_recall_and_precision_on_name_variants(sample: ScreeningList) -> None:
    tp = fn = fp = 0
    for name, want in VARIANTS["variants"]:
        ids = [h["entry"]["id"] for h in sample.screen(name)["hits"]]
        tp += want in ids
        fn += want not in ids
        fp += sum(i != want for i in ids)
    fp += sum(len(sample.screen(n)["hits"]) for n in VARIANTS["innocents"])
    recall, precision = tp / (tp + fn), tp / (tp + fp)
    assert recall >= 0.98 and precision >= 0.9, (recall, precision)


@pytest.fixture(scope="module")
def extended() -> ScreeningList:
    """The sample list with the vectors' extra fictitious entries (long company names to abbreviate)."""
    doc = json.loads(SAMPLE.read_text())
    doc["results"] = doc["results"] + VARIANTS["list_extra"]
    return ScreeningList.parse(json.dumps(doc).encode(), "sample+extra")


def _scores(lst: ScreeningList, variants: list, innocents: list) -> tuple[float, float, list]:
    tp = fn = fp = 0
    wrong = []
    for name, want in variants:
        ids = [h["entry"]["id"] for h in lst.screen(name)["hits"]]
        tp += want in ids
        fn += want not in ids
        fp += sum(i != want for i in ids)
        if want not in ids or len(ids) > 1:
            wrong.append((name, want, ids))
    for n in innocents:
        hits = lst.screen(n)["hits"]
        fp += len(hits)
        wrong += [(n, None, [h["entry"]["id"] for h in hits])] if hits else []
    return tp / (tp + fn), tp / max(tp + fp, 1), wrong


@pytest.mark.parametrize(("part", "min_precision"), [("tuning", 0.95), ("held_out", 0.95), ("held_out_2", 0.95)])
def test_recall_and_precision_on_confusable_dotted_and_abbreviated_variants(extended: ScreeningList, part: str,
                                                                            min_precision: float) -> None:  # fmt: skip
    """Issue 17 target: recall >= 0.98 at precision >= 0.95 on held-out variants.  The second held-out set
    (written later) held shortened company names labelled innocent that the matcher flagged (e.g. "Bright
    Semiconductor Inc" against the alias "Bright Semi"): 0.93 then; the organisation rules that followed were
    tuned on it (recall 1.0, precision 1.0), so it is no longer held out."""
    recall, precision, wrong = _scores(extended, VARIANTS[part], VARIANTS[f"{part}_innocents"])
    assert recall >= 0.98 and precision >= min_precision, (recall, precision, wrong)


def _heldout(k: int) -> tuple[list, list]:
    doc = json.loads((Path(__file__).parents[1] / "vectors" / f"screening_variants_heldout{k}.json").read_text())
    return doc[f"held_out_{k}"], doc[f"held_out_{k}_innocents"]


@pytest.mark.parametrize(("k", "min_recall", "min_precision"), [
    # set 3: written before its branch's changes; 49/49 at 49/52 = 0.942 then (three false hits on people: "Li
    # Wei", "Wang Xiaoping", "Fatima Zahra Bennani"); the person-name check (screen_people) was tuned on it
    (3, 1.0, 1.0),
    # set 4: written before the person-name check, never tuned on.  Before: 94/95 at 94/100 = 0.94.  First
    # measure after the check: 92/95 = 0.968 at 0.968 (people written with digit look-alikes lost).  After the
    # digit readings (set 5 written before them) and the check's cheaper first pass (no tuning on sets 4-5, but
    # made after seeing them): 94/95 = 0.989 at 94/97 = 0.969, the issue's target.  Round 4 (its remaining miss and
    # false hits were named in docs/EXPORT.md, so seen): 95/95 at 95/95
    (4, 1.0, 1.0),
    # set 5: people only, written after set 4 showed the digit loss and before mending it, never tuned on.
    # Before any change on the branch: 21/28 at 21/23; first measure after the digit readings: 27/28 at 27/29;
    # now 28/28 at 28/30 = 0.933, under the issue's precision target ("Kim Chol" and "Li Dong", a Korean or
    # Chinese given name cut in its middle, flagged), asserted as measured so that a regression shows.  Round 4
    # (a person named in Han or Hangul is matched syllable by syllable; seen): 28/28 at 28/28
    (5, 1.0, 1.0),
    # set 6 (182 variants, 155 innocents; written blind): first measure, once, on round 4's matcher: 163/182 =
    # 0.896 at 1.0.  Round 4b tuned on its 19 misses' classes (so no longer held out): 182/182 at 182/182
    (6, 1.0, 1.0),
    # sets 7 to 11 (about 200 variants and 150 innocents each), each written blind by an analyst who never read
    # the matcher, the other sets or their measures, and measured once before anything was tuned on it.  First
    # measures (recall at precision): 7: 240/248 = 0.968 at 0.996; 8: 191/200 = 0.955 at 1.0; 9: 205/212 = 0.967
    # at 1.0; 10: 212/218 = 0.972 at 1.0; 11: 219/224 = 0.978 at 1.0 (the issue's target is 0.98 at 0.95).  Each
    # was then tuned on (its misses' classes: one slip in a long name, rn read as m, exonyms, Wade-Giles firms,
    # Russian translations and city adjectives, Belarusian vowels, joined or bracketed words); now as asserted.
    # Left missed: a Chinese translation of a listed firm (7), "GZ ... Comp." (7), and a firm's name without its
    # last generic word (9: "North Star Electronics" for "... Electronics Manufacturing Company", which other
    # analysts wrote as an innocent of the same kind); one false hit: "Nova Microsystems" for "Novatek
    # Microsystems" (7).
    (7, 0.99, 0.995), (8, 1.0, 1.0), (9, 0.995, 1.0), (10, 1.0, 1.0), (11, 1.0, 1.0),
    # set 12 (281 variants, 170 innocents; written blind as 7-11), measured once on the matcher tuned on 7-11:
    # 281/281 at 281/281, no false hit: the issue's target (0.98 at 0.95) met on a set not tuned on
    (12, 1.0, 1.0),
])  # fmt: skip
def test_held_out_sets_measured(extended: ScreeningList, k: int, min_recall: float, min_precision: float) -> None:
    pos, neg = _heldout(k)
    recall, precision, wrong = _scores(extended, pos, neg)
    assert len(neg) >= 25 and len(pos) >= 25
    assert recall >= min_recall - 1e-9 and precision >= min_precision - 1e-9, (recall, precision, wrong)


@pytest.mark.parametrize(("name", "want"), [("Ser gei Pet rov", "sample-000"),
                                          ("S e r g e i  P e t r o v", "sample-000"),
                                          ("Dmi try Vasiliev", "sample-013"),
                                          ("Shenzhen Bri ght Semiconductor", "sample-006"),
                                          ("Sergei Petrova", None), ("Olga Pet rova", None), ("Pet rov Ivan", None)])
def test_a_name_split_apart_at_random_places_is_joined_again(sample: ScreeningList, name: str,
                                                             want: str | None) -> None:  # fmt: skip
    """ATTACK (red team, round 4): spaces put inside the words of a listed name ("Ser gei Pet rov") cleared it.
    Fragments that join into a word of the list are joined and the name screened again, with every check;
    innocents whose fragments join into other names stay clear."""
    ids = [h["entry"]["id"] for h in sample.screen(name)["hits"]]
    assert ids == ([want] if want else []), (name, ids)


@pytest.mark.parametrize("mark", ["\u200b", "\u00ad", "\u200d", "\u200c", "\u2060", "\ufeff", "\u200e", "\u202e",
                                  "\u180e"])  # fmt: skip
def test_invisible_format_characters_do_not_hide_a_name(extended: ScreeningList, mark: str) -> None:
    """Attack (issue 17, set 6): a Unicode format character (Cf: zero-width space, soft hyphen, ZWJ / ZWNJ, word
    joiner, BOM, bidirectional marks) typed inside a listed name's words to split them; it is dropped before
    matching, so the name is still a hit, and an innocent name stays clear."""
    import unicodedata

    assert unicodedata.category(mark) == "Cf"
    for name, want in [("Aleksandr Sokolov", "sample-007"), ("Global Tensor Trading", "sample-012"),
                       ("Kestrel Semi", "extra-005")]:  # fmt: skip
        hidden = " ".join(w[:3] + mark + w[3:] for w in name.split()) + mark
        ids = [h["entry"]["id"] for h in extended.screen(hidden)["hits"]]
        assert ids == [want], (ascii(hidden), ids)
    assert extended.screen(f"Damascus Steel{mark} Knives")["hits"] == []


@pytest.mark.parametrize(("name", "want"), [
    ("Соколов А. В.", "sample-007"), ("Sokolov A. V.", "sample-007"),  # initials in the name's own script
    ("Соколов Б. В.", None),
    ("中兴精密仪器股份有限公司", "sample-001"),  # a company form in Chinese script is not a name word
    ("Novatek Microsystems Limited Liability Company", "sample-003"),
    ("Caucasus General Machinery Impex LLC", "extra-009"), ("Caucasus Impex", None),
    ("Caspian Dualuse Logistics Ltd", "sample-019"),  # two words of the name written as one
    ("Global Tensor Trading, Sharjah", "sample-012"),  # a place after a comma
    ("Hengtai Electronics Shenzhen Representative Office", "sample-021"),  # a branch or an office
    ("Sunrise Medical Dubai Branch", None), ("Global Trading Dubai Branch", None),
    ("Tensor Trading Dubai Branch", None),
    ("Aliakbar Hoseini", "sample-018"), ("Aliakbar Rahimi", None),  # two given names written as one
    ("Fatimah al-Zahra Ibn Ali", "sample-022"), ("Fatimah al-Zahra Bin Salem", None),  # al-, bin / ben, Fatimah
    ("Eastern Hvy Industries Intl", "extra-004"),
    ("Kestrel Semiconductor", "extra-005"), ("Kestral Semi Manufacturing", "extra-005"),
    # a Cantonese reading of a person named in Han (王小明 Wang Xiaoming): found by rigour's name symbols
    ("Wong Siu Ming", "sample-017"), ("Kin-kwok Chan", "sample-024"), ("Chan Kin Man", None),
    ("Chan Wing Kwok", None), ("Wong Kin Kwok", None),
])  # fmt: skip
def test_round_4b_classes(extended: ScreeningList, name: str, want: str | None) -> None:
    """The classes behind set 6's misses (issue 17, round 4b), on names that are not set 6's."""
    ids = [h["entry"]["id"] for h in extended.screen(name)["hits"]]
    assert ids == ([want] if want else []), (name, ids)


@pytest.mark.parametrize(("name", "want"), [
    ("Li Wei", None), ("Kim Chol Min", None), ("Li Weidong", "sample-011"),  # a name cut at an end, or another
    ("Wang Xiaoping", None), ("Wang Xiaoming", "sample-017"),  # one syllable away is another given name
    ("Fatima Zahra Bennani", None), ("Fatima Zahra Benali", "sample-022"),
    ("Sergei Petrov", "sample-000"), ("Petrov, Sergey", "sample-000"),  # a patronymic may be left out
    ("Nikolai Petrov", None), ("Sergei Ivanovich Smirnov", None),  # given and family name both matched
    ("Evgenii Borisovich Morozov", "sample-015"),  # one name in another transliteration (rigour's symbols)
    ("Serg3i Petr0v", "sample-000"), ("Kim Ch0l Ho", "sample-004"), ("Serg3i Ivan0v", None),  # digits for letters
])  # fmt: skip
def test_a_person_is_matched_part_by_part(extended: ScreeningList, name: str, want: str | None) -> None:
    """Common personal names one name away from a listed person are cleared (issue 17, set 3's false hits);
    the listed person's name however written is still a hit."""
    ids = [h["entry"]["id"] for h in extended.screen(name)["hits"]]
    assert ids == ([want] if want else []), (name, ids)


@pytest.mark.parametrize(("name", "want"), [
    ("Bright Semi Co", "sample-006"), ("Bright Semiconductor Inc", None),  # a short alias matches as written
    # ... unless every word that says which firm it is, is there: "Kestrel Semiconductor" of "Kestrel Semiconductor
    # Manufacturing" (round 4b: set 6 lists it as the firm, which this test had cleared; Bright lacks "Shenzhen")
    ("Kestrel Semi Ltd", "extra-005"), ("Kestrel Semiconductor Inc", "extra-005"), ("Kestrel Instruments", None),
    ("North Star Electronics Mfg", "extra-011"), ("North Star Manufacturing", None),  # a word of the name lacking
    ("Orion AI Technologies", "extra-001"), ("Orion Technologies Inc", None),
    ("Guangzhou Hengtai Electronic Comp. Co.", "sample-021"),  # a word cut short is still there
    ("Novatek Micro Systems", "sample-003"),  # written joined
])  # fmt: skip
def test_an_organisation_is_named_by_all_its_words(extended: ScreeningList, name: str, want: str | None) -> None:
    ids = [h["entry"]["id"] for h in extended.screen(name)["hits"]]
    assert ids == ([want] if want else []), ids


@pytest.mark.parametrize(("name", "want"), [
    ("Volga Precision Manufacturing Kazan Branch", "extra-000"), ("Novatek Microsystems Moscow", "sample-003"),
    ("Zhongxing Precision Instruments Shanghai", "sample-001"),
])  # fmt: skip
def test_attack_a_word_appended_to_a_listed_organisation_is_still_caught(extended: ScreeningList, name: str,
                                                                         want: str) -> None:  # fmt: skip
    """The organisation rules take nothing from a listed name; an evader adding a city or "Branch" is caught."""
    hits = extended.screen(name)["hits"]
    assert hits and hits[0]["entry"]["id"] == want, hits


def test_the_prefilter_finds_what_scoring_every_name_finds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The letter-count bound and the shared-word index only skip names that cannot score: the hits are those
    of scoring every name, on a list of generated names with near-duplicates of each other."""
    import random

    from weightwarden.release.screen import Entry

    rng = random.Random(7)
    syl = ["ka", "ri", "mo", "tan", "vel", "zor", "shi", "lin", "pet", "nik", "ov", "chen", "hua", "ski"]

    def name() -> str:
        return " ".join("".join(rng.choice(syl) for _ in range(rng.randint(2, 3))).capitalize()
                        for _ in range(rng.randint(2, 3)))  # fmt: skip

    base = json.loads(SAMPLE.read_text())["results"] + VARIANTS["list_extra"]
    entries = [Entry(str(r["id"]), r["name"], tuple(r.get("alt_names") or ()), r.get("type", "")) for r in base]
    entries += [Entry(f"g{i}", name(), (name(),) if i % 2 else (), "Entity" if i % 3 else "Individual")
                for i in range(600)]  # fmt: skip
    lst = ScreeningList(entries, "generated", "-")
    queries = [n for n, _ in VARIANTS["held_out"]] + VARIANTS["held_out_innocents"]
    queries += [e.name for e in entries[40:90]] + [e.name[:-1] + "a" for e in entries[90:140]]
    queries += [" ".join(reversed(e.name.split())) for e in entries[140:170]]
    queries += [e.name[:2] + "u" + e.name[3:-1] + "e" for e in entries[170:250]]  # two letters off: ~86-90
    fast = [lst.screen(q) for q in queries]
    monkeypatch.setattr(ScreeningList, "_candidates", lambda self, *a: list(range(len(self._names))))
    slow = [lst.screen(q) for q in queries]
    assert sum(len(r["hits"]) for r in fast) > 100
    assert fast == slow


# "Ѕеrgеі Іνаnоνісh Ρеtrоν" as issue 17 gives it: Cyrillic and Greek letters among Latin ones
ISSUE_LOOKALIKE = "\u0405\u0435rg\u0435\u0456 \u0406\u03bd\u0430n\u043e\u03bd\u0456\u0441h \u03a1\u0435tr\u043e\u03bd"


@pytest.mark.parametrize(("name", "want"), [
    (ISSUE_LOOKALIKE, "sample-000"),
    ("S.e.r.g.e.i P.e.t.r.o.v", "sample-000"), ("T.A.C.R.C.", "sample-005"), ("TACRC Tehran", "sample-005"),
    ("Shenzhen Bright Semiconductor Tech Corp", "sample-006"), ("Orion AI Technologies", "extra-001"),
    ("Volga Precision Mfg. Corp", "extra-000"), ("Baltic Int'l Trading Co", "extra-002"),
    ("H_a_s_s_a_n K_a_r_i_m_i", "sample-009"), ("M. A. Orlov", "extra-010"),
])  # fmt: skip
def test_attack_look_alikes_dots_and_abbreviations_are_caught(extended: ScreeningList, name: str,
                                                              want: str) -> None:  # fmt: skip
    """The exact strings of issue 17 that cleared screening now match the listed party."""
    hits = extended.screen(name)["hits"]
    assert hits and hits[0]["entry"]["id"] == want, hits
    assert normalize("\u0405\u0435rg\u0435\u0456 \u0406\u03bd\u0430n\u043e\u03bd\u0456\u0441h") == "sergei ivanovich"
    # a word of another script is transliterated, not read as look-alikes
    assert normalize("Сергей Петров") == "sergei petrov"


def test_a_hit_is_explained(sample: ScreeningList) -> None:
    r = sample.screen("Petrov Sergei Ivanovich", country="DE", aliases=("S. Petrov",))
    assert r["decision"] == "match"
    h = r["hits"][0]
    assert h["entry"]["id"] == "sample-000" and h["score"] >= 86
    ex = h["explanation"]
    assert ex["query_normalized"] == "petrov sergei ivanovich" and {"token_sort", "token_set", "ratio"} <= set(ex)
    assert ex["country"] == "DE not listed for the entry"  # noted, not a reason to clear
    assert r["list"]["format"] == "csl-json" and len(r["list"]["sha256"]) == 64
    assert sample.screen("Ada Lovelace")["decision"] == "clear"
    assert normalize("Сергей Петров") == "sergei petrov"
    assert normalize("ACME Trading Co., Ltd.") == "acme trading"


def test_csv_and_followthemoney_formats(tmp_path: Path) -> None:
    csv = tmp_path / "csl.csv"
    csv.write_text('_id,source,name,type,addresses,alt_names,programs\n'
                   'x1,Entity List,Volga Photonics JSC,Entity,"1 Lenina St, Kazan, RU",'
                   'Volga Photonika;VPJ,EAR\n')  # fmt: skip
    lst = ScreeningList.load(csv)
    assert lst.format == "csl-csv" and lst.entries[0].countries == ("RU",)
    assert lst.screen("Volga Photonika")["hits"][0]["entry"]["id"] == "x1"
    ftm = tmp_path / "entities.ftm.json"
    rows = [{"id": "os-1", "schema": "Person", "datasets": ["us_ofac_sdn"],
             "properties": {"name": ["Ivan Drago"], "alias": ["Иван Драго"], "country": ["ru"]}},
            {"id": "os-2", "schema": "Address", "properties": {"full": ["somewhere"]}}]  # fmt: skip
    ftm.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    lst = ScreeningList.load(ftm)
    assert lst.format == "opensanctions-ftm" and len(lst.entries) == 1
    assert lst.screen("Иван Драго")["hits"][0]["entry"]["id"] == "os-1"


def test_bad_lists_fail_closed(tmp_path: Path) -> None:
    for content in (b"", b"hello world\n", b'{"results": [{"nom": "x"}]}', b"{not json", b"\xff\xfe\x00",
                    b'{"results": []}', b'{"schema": "Person", "properties": 1}\n'):  # fmt: skip
        f = tmp_path / "bad"
        f.write_bytes(content)
        with pytest.raises(ScreeningError):
            ScreeningList.load(f)
    with pytest.raises(ScreeningError):
        ScreeningList.load(tmp_path / "missing.json")


def test_cli_screen_and_update(cli_env: dict[str, str], tmp_path: Path) -> None:
    r = warden(cli_env, "screen", "Kim Chol-Ho", "--json")
    assert r.returncode == 4, r.stderr  # a hit (issue 19: exit 4, denied/hit)
    assert json.loads(r.stdout)["hits"][0]["entry"]["id"] == "sample-004" and "SAMPLE" in r.stderr
    mine = tmp_path / "list.csv"
    mine.write_text("_id,source,name,type,addresses,alt_names,programs\nz9,SDN,Orion Cyber Ltd,Entity,,,\n")
    r = warden(cli_env, "screen", "update", "--file", str(mine), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["entries"] == 1
    r = warden(cli_env, "screen", "Orion Cyber Limited", "--json")
    assert json.loads(r.stdout)["hits"][0]["entry"]["id"] == "z9" and r.returncode == 4
    r = warden(cli_env, "screen", "check", "Kim Chol-Ho", "--json")
    assert json.loads(r.stdout)["decision"] == "clear" and r.returncode == 0
    bad = tmp_path / "bad.txt"
    bad.write_text("nothing here")
    r = warden(cli_env, "screen", "update", "--file", str(bad))
    assert r.returncode == 1 and "unknown screening-list format" in r.stderr
    r = warden(cli_env, "screen", "Orion Cyber", "--json")  # the loaded list is still the good one
    assert json.loads(r.stdout)["list"]["origin"] == "list.csv"


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                         ["results", "name", "alt_names", "addresses", "country", "schema", "properties", "alias",
                          "programs", "id"]), c, max_size=5), max_leaves=15)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), _json.map(lambda o: json.dumps(o).encode())))
def test_hostile_lists_are_a_typed_error(data: bytes) -> None:
    with contextlib.suppress(ScreeningError):
        ScreeningList.parse(data)


@pytest.mark.parametrize(("name", "want"), [
    ("Sergei Ivanovich Petrov Moscow", "sample-000"), ("Kim Chol Ho Pyongyang", "sample-004"),
    ("Wang Xiaoming Beijing", "sample-017"), ("Fatima Zahra Benali Casablanca", "sample-022"),
    ("Kim Chol Ho Jr", "sample-004"), ("Sergei Ivanov Petrov", "sample-000"),
])  # fmt: skip
def test_attack_a_word_appended_to_a_listed_persons_full_name_is_still_caught(extended: ScreeningList, name: str,
                                                                             want: str) -> None:  # fmt: skip
    """ATTACK: the part-by-part check once cleared a listed person's whole name with a city, a suffix or a short
    patronymic added (every query word had to be matched), which the string scores alone had caught."""
    assert [h["entry"]["id"] for h in extended.screen(name)["hits"]][:1] == [want], name


def test_attack_a_name_that_is_not_text_is_a_typed_error(sample: ScreeningList) -> None:
    """ATTACK: a byte that is not UTF-8 on the command line (a lone surrogate) crashed screening with a
    traceback; it is one ScreeningError line, and the CLI exits 1 without a traceback."""
    with pytest.raises(ScreeningError, match="is not valid text"):
        sample.screen("Sergei \udcff Petrov")
    with pytest.raises(ScreeningError, match="is not valid text"):
        sample.screen("Someone", aliases=("Sergei \udcff Petrov",))


PROBE4 = json.loads((Path(__file__).parents[1] / "vectors" / "screening_probe_round4.json").read_text())


def test_round4_probe_measured(extended: ScreeningList) -> None:
    """Round 4's probe (written before the change by the engineer who tuned, so not held out): before the change
    12/45 found at 12/13; now all found with no false hit.  Asserted as measured, so that a regression shows."""
    recall, precision, wrong = _scores(extended, PROBE4["round4_probe"], PROBE4["round4_probe_innocents"])
    assert recall == 1.0 and precision == 1.0, (recall, precision, wrong)


@pytest.mark.parametrize(("name", "want"), [
    # "-off" and German / Polish spellings: one folded spelling (w / v, -ff / -v, z / ts / c, j / y, ie / e)
    ("Alexandre Sokoloff", "sample-007"), ("Dmitrij Olegowitsch Wassiljew", "sample-013"),
    ("Mikołaj Kuźniecow", "sample-020"), ("Ivan Petroff", None), ("Dmitrij Morosow", None),
    # Ukrainian and English forms of a given name (lists/person_names.json), the family name still matched
    ("Serhii Ivanovych Petrov", "sample-000"), ("Mykhaylo Orlov", "extra-010"), ("Nicholas Kuznetsoff", "sample-020"),
    ("Mykola Sokolov", None), ("Eugene Kuznetsov", None), ("Michael Petrov", None),
    # one letter off in an Arabic name, and Mohd / Md; a derived name (nisba, feminine) is another name
    ("Muhammed Al Rashidy", "sample-002"), ("Md. Al-Rashidi", "sample-002"), ("Ali Akbar Husseini", "sample-018"),
    ("Mohammed Al-Rashid", None), ("Muhammad Al-Rashed", None), ("Ali Akbar Hosseinzadeh", None),
    ("Sergei Petrova", None), ("Serge Petrov", "sample-000"),
    ("Nikolai Kuznetsova", None),
    # a title or a note written with the name (rigour's person prefixes and lists/person_names.json)
    ("Haj Ali Akbar Hosseini", "sample-018"), ("Alexander Sokolov, CEO", "sample-007"),
    ("Colonel Mikhail Orlov", "extra-010"), ("Sheikh Ali Al-Rashidi", None), ("Colonel Sergei Ivanov", None),
    # Wade-Giles, Western surname order and spelling, McCune-Reischauer
    ("Chen Chien-Kuo", "sample-024"), ("Li Wei-Tung", "sample-011"), ("Lee Weidong", "sample-011"),
    ("Kim Ch'ol-ho", "sample-004"), ("Wang Hsiao-ping", None), ("Chen Chien-min", None), ("Kim Chol-su", None),
    # a Chinese or Korean given name cut to one syllable is another name (set 4 and 5's false hits' class)
    ("Lee Dong", None), ("Kim Ho", None), ("Wang Ming Hua", None),
])  # fmt: skip
def test_round4_classes(extended: ScreeningList, name: str, want: str | None) -> None:
    """Issue 17, round 4: the red team's classes of misses are found (strings not in the probe set), and a
    different person written the same way, one per class at least, stays clear."""
    ids = [h["entry"]["id"] for h in extended.screen(name)["hits"]]
    assert ids == ([want] if want else []), (name, ids)


@pytest.mark.parametrize(("name", "want"), [
    ("Western Heavy Industries International Corporation", None),  # a word one letter longer at its start
    ("Eastern Heavy Industries Internacional Corp", "extra-004"),  # a word misspelt inside is the same word
])  # fmt: skip
def test_an_organisation_word_with_another_first_letter_is_another_word(extended: ScreeningList, name: str,
                                                                        want: str | None) -> None:  # fmt: skip
    ids = [h["entry"]["id"] for h in extended.screen(name)["hits"]]
    assert ids == ([want] if want else []), (name, ids)


def test_a_person_found_part_by_part_is_explained_and_kept_under_a_stricter_threshold(extended: ScreeningList) -> None:
    """A hit the string scores miss carries its score (88) and says how it was found; a caller asking a stricter
    threshold than that does not get it."""
    r = extended.screen("Jewgenij Morosow")
    assert [h["entry"]["id"] for h in r["hits"]] == ["sample-015"]
    assert r["hits"][0]["score"] == 88.0 and r["hits"][0]["explanation"]["part_by_part"] is True
    assert extended.screen("Jewgenij Morosow", threshold=95)["hits"] == []


def test_the_person_name_table_is_well_formed() -> None:
    """Each given name is in one group, lower-case ASCII, as normalize() writes it (else it never matches)."""
    doc = json.loads((ROOT / "src/weightwarden/release/lists/person_names.json").read_text())
    words = [w for g in doc["given_names"] for w in g]
    assert len(words) == len(set(words)), sorted(w for w in set(words) if words.count(w) > 1)
    assert [w for w in words if normalize(w) != w] == []
    assert [w for w in doc["titles"] if normalize(w) not in (w, "")] == []  # "" where rigour drops it already


def test_attack_one_letter_repeated_is_screened_not_a_crash(sample: ScreeningList) -> None:
    """ATTACK (found in round 4): a name of one letter repeated 100,000 times overflowed the letter counts
    (int16) with a traceback; it is screened (and clear)."""
    assert sample.screen("x" * 100_000)["decision"] == "clear"


@pytest.mark.parametrize(("name", "want"), [
    # one slip in a long name where two other names agree; not where only one does (another person)
    ("Nikolai Petrovich Kuznestov", "sample-020"), ("Mohammed bin Abdullah Al-Rashldi", "sample-002"),
    ("Wang Xiaoping", None), ("Nikolai Petrovich Kuznetsova", None),
    # neighbouring letters swapped where another name agrees
    ("Wnag Xiaoming", "sample-017"),
    # "rn" scanned as "m" and the other way round; "l" scanned for "I" at a word's start
    ("Drnitry Olegovich Vasiliev", "sample-013"), ("Novatek rnicrosystems LLC", "sample-003"),
    ("Zhongxing Precision lnstruments Co., Ltd.", "sample-001"),
    # a firm's word misspelt, a city in another language, a note in brackets, a Wade-Giles name
    ("Shenzen Bright Semiconductor Technology Co Ltd", "sample-006"),
    ("Dimashq Scientific Studies Directorate", "sample-016"), ("Damas Scientific Studies Directorate", "sample-016"),
    ("Chung-hsing Precision Instruments Co.", "sample-001"), ("Chong Xing Precision Instruments", None),
    # the Arabic article assimilated, or joined; Belarusian vowels
    ("Muhammad ar-Rashidi", "sample-002"), ("Mohammed Abdullah Alrashidi", "sample-002"),
    ("Aliaksandr Viktaravich Sakalou", "sample-007"), ("Hossein Karimi", None), ("Mikhail Orlovsky", None),
    # a listed firm translated into Russian, its city as an adjective
    ("Минский оптоэлектронный завод", "sample-010"), ("ООО Новатек Микросистемы", "sample-003"),
    # a joined alias, a roman numeral
    ("BrightSemi", "sample-006"), ("Korea Computer Centre, Branch III", "sample-008"),
    ("Orion AI Labs Inc", None), ("Brighton Semiconductors", None),
])  # fmt: skip
def test_round5_spellings_that_held_out_sets_7_to_11_missed(sample: ScreeningList, name: str,
                                                            want: str | None) -> None:  # fmt: skip
    """Each class of miss of the blind sets 7-11, with an innocent of the same shape beside it."""
    ids = [h["entry"]["id"] for h in sample.screen(name)["hits"]]
    assert (ids[:1] == [want]) if want else ids == [], (name, ids)


_NAME_BITS = st.sampled_from(["al", "ar", "rn", "m", "(", ")", "[", "]", "-", "'", "sky", "ou", "iii", "Br.",
                              "\u200b", "\u00ad", "Ѕ", "е", "ⅲ", "𝐍", "1", "0", " ", "  ", "Bright", "Semi",
                              "Rashidi", "Petrov", "Novatek", "Minsk", "завод", "张", "ho", "hsing"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(_NAME_BITS, st.text(max_size=6)), max_size=12).map("".join))
def test_screen_takes_any_text_and_answers(sample: ScreeningList, name: str) -> None:
    """FUZZ: the readings added for held-out sets 7-11 (brackets, articles, rn / m, split and joined words, city
    adjectives, Wade-Giles syllables) on any text: a decision, or the one error for text that is not UTF-8."""
    try:
        r = sample.screen(name)
    except ScreeningError as e:
        assert "not valid text" in str(e)
        return
    assert r["decision"] in ("match", "clear") and (r["decision"] == "match") == bool(r["hits"])
    assert all(h["entry"]["id"].startswith("sample-") for h in r["hits"])


def test_the_name_symbols_are_asked_only_for_syllable_long_words(sample: ScreeningList, monkeypatch) -> None:
    """rigour's name symbols cost seconds the first time a process asks for them (the `warden screen check` of a
    Latin name took 5 s): only a query of one-syllable words ("Chan Kin-kwok") may ask for them."""
    import weightwarden.release.screen as screen_mod

    asked: list[str] = []
    monkeypatch.setattr(screen_mod, "name_symbols", lambda n: asked.append(n) or [])
    fresh = ScreeningList(sample.entries, "sample", "-")
    assert [h["entry"]["id"] for h in fresh.screen("Sergej Petrow")["hits"]] == ["sample-000"]
    assert fresh.screen("Hans Mueller")["decision"] == "clear" and asked == []
    fresh.screen("Chan Kin-kwok")
    assert asked and "chan kin kwok" in asked
