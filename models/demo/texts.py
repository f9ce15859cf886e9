"""Offline English sentence sources for the demo corpus.

Three sources, all read from Debian packages or generated here (nothing is downloaded):

* **fortunes** -- ``/usr/share/games/fortunes`` (Debian ``fortunes-min`` + ``fortunes``), only
  a whitelist of the cleaner files, split into single sentences and filtered hard (plain ASCII
  letters and simple punctuation, 3-25 words, no digits, no shouting, a word blacklist).
* **wordnet** -- the quoted example sentences in WordNet 3.0's ``data.*`` files
  (Debian ``wordnet-base``).
* **templates** -- slot-filled sentences with names, numbers, dates, times, money, places,
  everyday, political and speech-like phrases (``fellow citizens``, ``our nation``, ...).

Conventions of the text (what the synthesizers read aloud is exactly what is written):

* numbers are spelled out as words without hyphens (``twenty five dollars``), so the audio and
  the transcript always agree; sentences from the packages that hold digits are dropped;
* every sentence starts with a capital letter and ends with ``.``, ``?`` or ``!``.

The JFK sentence used as the human-speech test ("ask not what your country can do for you ...")
and close paraphrases are rejected everywhere (:func:`is_jfk_like`).

The train / held-out split is a stable hash of the normalized sentence (:func:`split_of`), so it
does not depend on the seed, on the order of sources or on which other sentences exist: a
held-out sentence can never reach training.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ...runtime.errors import FastSLMError

FORTUNE_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")

# The cleaner fortune files. Left out: men-women, ethnic, drugs, medicine, love, zippy (nonsense),
# IRC logs and jargon (knghtbrd, linux, linuxcookie, debian, perl), definitions, disclaimer,
# ascii-art, translate-me, magic.
FORTUNE_FILES = (
    "fortunes", "literature", "riddles",  # fortunes-min
    "wisdom", "platitudes", "people", "politics", "science", "work", "education", "food",
    "computers", "humorists", "law", "miscellaneous", "pets", "sports", "art", "songs-poems",
    "kids", "goedel", "cookie", "paradoxum", "tao", "news", "startrek",
)

HELDOUT_PERCENT = 4  # ~4% of distinct sentences are held out (by hash)
MIN_WORDS, MAX_WORDS = 3, 25

JFK_SENTENCE = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)
# Phrases of the JFK sentence distinctive enough that any sentence holding one is rejected.
_JFK_PHRASES = (
    "ask not", "fellow americans", "what your country", "your country can", "country can do",
    "for your country", "do for you ask", "ask what you can", "can do for you",
    "do for your nation", "do for your people",
)

# Words that mark a sentence as offensive, sexual, violent in a graphic way, or about drugs.
_BLACKLIST = set(
    """
    sex sexual sexually sexy rape raped rapist fuck fucking fucked shit shitty damn damned
    goddamn hell bitch bastard ass asses asshole arse whore whores slut prostitute prostitutes
    prostitution porn porno pornography nude naked nudity penis vagina breast breasts boob boobs
    tits orgasm erotic erection virgin virginity condom masturbate masturbation homosexual gay
    gays lesbian queer fag faggot dyke nigger niggers negro negroes coon jew jews jewish kike
    chink jap spic wop retard retarded cripple midget suicide kill killed killing kills killer
    murder murdered murderer murders rifle gun guns shoot shooting shot stab stabbed bomb bombs
    drunk drunken beer whiskey liquor vodka booze marijuana cocaine heroin lsd pot stoned dope
    hitler nazi nazis satan devil god christ jesus allah bible church religion religious
    pregnant abortion bed screw screwed piss pissed crap bloody dick cock pussy wife husband
    mistress adultery seduce seduced lust lover lovers kiss kissed kissing cancer death dead die
    dies died dying corpse
    """.split()
)

_ALLOWED = re.compile(r"^[A-Za-z][A-Za-z ,.'?!;:-]*[.?!]$")
_WORD_STRIP = re.compile(r"[^a-z0-9']+")


def normalize_key(text: str) -> str:
    """Lower-case, keep letters/digits/apostrophes, single spaces: the identity of a sentence."""
    return " ".join(w for w in _WORD_STRIP.sub(" ", text.lower()).split() if w.strip("'"))


def _hash_int(text: str) -> int:
    return int.from_bytes(hashlib.sha1(normalize_key(text).encode("utf-8")).digest()[:8], "big")


def split_of(text: str) -> str:
    """``"heldout"`` or ``"train"``, from a stable hash of :func:`normalize_key`."""
    return "heldout" if _hash_int(text) % 100 < HELDOUT_PERCENT else "train"


def _trigrams(words: list[str]) -> set[tuple[str, str, str]]:
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}  # type: ignore[misc]


_JFK_TRIGRAMS = _trigrams(normalize_key(JFK_SENTENCE).split())


def is_jfk_like(text: str) -> bool:
    """True for the JFK test sentence, any part of it, or close paraphrases."""
    key = " " + normalize_key(text) + " "
    if any(" " + p + " " in key for p in _JFK_PHRASES):
        return True
    words = key.split()
    if len(_trigrams(words) & _JFK_TRIGRAMS) >= 2:
        return True
    # paraphrases: "ask ... do for ..." in one sentence
    return ("ask" in words or "asks" in words) and " do for " in key


def clean_sentence(text: str) -> str | None:
    """Return the sentence in corpus form, or None when it fails the filters."""
    text = text.replace("`", "'").replace('"', "").replace("--", ", ")
    text = re.sub(r"\s+", " ", text).strip(" ,;:-'")
    text = re.sub(r"\s+([,.;:?!])", r"\1", text)
    text = re.sub(r",\s*,", ",", text)
    if not text:
        return None
    text = text[0].upper() + text[1:]
    if text[-1] not in ".?!":
        text += "."
    if not text.isascii() or not _ALLOWED.match(text):
        return None
    if ".." in text or re.search(r"[.?!;:][A-Za-z]", text) or re.search(r"[,;:][.?!]$", text):
        return None
    words = text.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    key_words = normalize_key(text).split()
    if len(key_words) < MIN_WORDS or any(w.strip("'") in _BLACKLIST for w in key_words):
        return None
    # shouting / acronyms (read letter by letter, inconsistent between engines)
    if any(len(w.strip(",.;:?!'-")) > 1 and w.strip(",.;:?!'-").isupper() for w in words[1:]):
        return None
    if any(len(w) > 18 for w in key_words) or any(w.count("'") > 1 for w in key_words):
        return None
    if is_jfk_like(text):
        return None
    return text


# ---------------------------------------------------------------------------------- fortunes
_SENT_SPLIT = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")


def fortune_sentences(fortune_dir: Path = FORTUNE_DIR) -> list[str]:
    """Single clean sentences from the whitelisted fortune files (file order, no dedupe)."""
    return list(_fortune_sentences(Path(fortune_dir)))


@functools.lru_cache(maxsize=4)
def _fortune_sentences(fortune_dir: Path) -> tuple[str, ...]:
    out: list[str] = []
    for name in FORTUNE_FILES:
        path = fortune_dir / name
        if not path.exists():
            continue
        for entry in path.read_text(encoding="latin-1").split("\n%\n"):
            lines = [ln for ln in entry.splitlines() if not re.match(r"^\s*--", ln)]
            # lines that are dialogue / lists / verse layout make poor sentences
            if any(re.match(r"^\s*([A-Z][a-z]*:|[0-9]+[.)]|[-*])", ln) for ln in lines):
                continue
            body = " ".join(ln.strip() for ln in lines)
            if not body or not body.isascii():
                continue
            for sentence in _SENT_SPLIT.split(body):
                cleaned = clean_sentence(sentence)
                if cleaned:
                    out.append(cleaned)
    return tuple(out)


# ----------------------------------------------------------------------------------- wordnet
def wordnet_sentences(wordnet_dir: Path = WORDNET_DIR) -> list[str]:
    """The quoted example sentences of WordNet 3.0 (file order, no dedupe)."""
    return list(_wordnet_sentences(Path(wordnet_dir)))


@functools.lru_cache(maxsize=4)
def _wordnet_sentences(wordnet_dir: Path) -> tuple[str, ...]:
    out: list[str] = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = wordnet_dir / f"data.{pos}"
        if not path.exists():
            continue
        with path.open(encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # license header
                gloss = line.split("|", 1)[1]
                for example in re.findall(r'"([^"]+)"', gloss):
                    cleaned = clean_sentence(example)
                    if cleaned:
                        out.append(cleaned)
    return tuple(out)


# --------------------------------------------------------------------------------- templates
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORD = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
    "nine": "ninth", "twelve": "twelfth",
}


def number_words(n: int) -> str:
    """0 <= n < 1,000,000 in words, no hyphens: 1205 -> 'one thousand two hundred five'."""
    if not 0 <= n < 1_000_000:
        raise ValueError(n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    rest = n % 1000
    return number_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_words(rest))


def ordinal_words(n: int) -> str:
    words = number_words(n).split()
    last = words[-1]
    if last in _ORD:
        last = _ORD[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join(words[:-1] + [last])


def year_words(y: int) -> str:
    if 2000 <= y < 2010:
        return number_words(y)
    hi, lo = divmod(y, 100)
    if lo == 0:
        return number_words(hi) + " hundred"
    return number_words(hi) + " " + (("oh " + _ONES[lo]) if lo < 10 else number_words(lo))


def _time_words(rng: random.Random) -> str:
    h = rng.randint(1, 12)
    m = rng.choice([0, 0, 5, 10, 15, 20, 25, 30, 30, 35, 40, 45, 45, 50, 55])
    style = rng.random()
    if m == 0:
        base = f"{number_words(h)} o'clock" if style < 0.5 else number_words(h)
    elif m == 30 and style < 0.5:
        base = f"half past {number_words(h)}"
    elif m == 15 and style < 0.5:
        base = f"a quarter past {number_words(h)}"
    elif m == 45 and style < 0.5:
        base = f"a quarter to {number_words(h % 12 + 1)}"
    elif m < 10:
        base = f"{number_words(h)} oh {number_words(m)}"
    else:
        base = f"{number_words(h)} {number_words(m)}"
    if rng.random() < 0.4:
        base += " " + rng.choice(["in the morning", "in the afternoon", "in the evening", "at night"])
    return base


_MONTHS = "January February March April May June July August September October November December".split()
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()


def _date_words(rng: random.Random) -> str:
    month, day = rng.choice(_MONTHS), ordinal_words(rng.randint(1, 28))
    r = rng.random()
    if r < 0.4:
        return f"{month} {day}"
    if r < 0.7:
        return f"the {day} of {month}"
    return f"{month} {day}, {year_words(rng.randint(1950, 2030))}"


def _money_words(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.5:
        d = rng.choice([rng.randint(1, 20), rng.randint(20, 100), rng.randint(100, 999) // 5 * 5])
        return f"{number_words(d)} dollar{'s' if d != 1 else ''}"
    if r < 0.8:
        d, c = rng.randint(1, 99), rng.choice([5, 10, 25, 49, 50, 75, 95, 99])
        return f"{number_words(d)} dollar{'s' if d != 1 else ''} and {number_words(c)} cents"
    return f"{number_words(rng.randint(2, 90))} {rng.choice(['thousand', 'million', 'billion'])} dollars"


_FIRST = """James Mary John Patricia Robert Jennifer Michael Linda William Elizabeth David Barbara
Richard Susan Joseph Jessica Thomas Sarah Charles Karen Daniel Nancy Matthew Lisa Anthony Betty
Mark Margaret Paul Sandra Steven Ashley Andrew Emily Kevin Donna Brian Michelle George Carol
Edward Amanda Ronald Melissa Timothy Deborah Jason Stephanie Jeffrey Rebecca Ryan Laura Jacob
Helen Gary Sharon Nicholas Cynthia Eric Kathleen Jonathan Amy Peter Anna Henry Ruth Walter
Julia Arthur Grace Samuel Alice Frank Rose Harold Clara Oliver Emma Lucas Sophia Maria Carlos
Ahmed Priya Wei Yuki Olga Pierre Hans Fatima Diego Ingrid Kofi Aisha Mateo Elena""".split()
_LAST = """Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Wilson
Anderson Taylor Thomas Moore Jackson Martin Lee Thompson White Harris Clark Lewis Robinson
Walker Young Allen King Wright Scott Hill Green Adams Baker Nelson Carter Mitchell Roberts
Turner Phillips Campbell Parker Evans Edwards Collins Stewart Morris Murphy Cook Rogers Reed
Bailey Cooper Howard Ward Peterson Gray James Watson Brooks Kelly Sanders Price Bennett Wood
Barnes Ross Henderson Coleman Jenkins Perry Powell Long Patterson Hughes Flores Washington
Butler Foster Bryant Russell Griffin Hayes Myers Ford Hamilton Graham Sullivan Wallace West
Cole Jordan Reynolds Fisher Ellis Harrison Gibson Marshall Owens""".split()
_TITLES = ["Mister", "Doctor", "Professor", "Senator", "Governor", "Judge", "Captain", "Mayor"]
_CITIES = """Boston Chicago Denver Seattle Dallas Houston Atlanta Phoenix Portland Detroit Miami
Memphis Austin Baltimore Philadelphia Pittsburgh Cleveland Nashville Richmond Sacramento London
Paris Berlin Madrid Rome Tokyo Toronto Sydney Dublin Oslo Vienna Cairo Lisbon Chicago Ottawa""".split()

def _options(text: str) -> list[str]:
    """'a|b c|d' -> ['a', 'b c', 'd']; a line break inside an option is a space, not a join."""
    return [" ".join(option.split()) for option in text.split("|")]


_PLACES = _options("""the library|the station|the airport|the market|the office|the hospital|the museum|the
park|the school|the bank|the city hall|the post office|the bakery|the hotel|the stadium|the
harbor|the bridge|the courthouse|the train station|the corner store|the town square|the
capitol|the farm|the beach|the mountains|the lake""")
_OBJECTS = _options("""book|letter|report|ticket|bicycle|umbrella|camera|laptop|map|key|coat|box of
apples|basket|lamp|chair|newspaper|package|phone|notebook|guitar|painting|clock|bag of
rice|pair of shoes|blue jacket|red car|small table|glass of water|cup of coffee|loaf of
bread""")
_PLURALS = _options("""apples|books|chairs|tickets|students|houses|letters|boxes|trees|cars|people|
volunteers|workers|children|teachers|miles|days|hours|minutes|years|votes|families|cities|
bridges|schools|songs|questions|pages|horses|birds""")
_VERBS_PAST = _options("""found|bought|sold|lost|borrowed|returned|painted|fixed|opened|carried|
delivered|ordered|wrapped|checked|cleaned|moved|signed|read|wrote|sent""")
_ADJ = _options("""quiet|busy|bright|cold|warm|long|short|difficult|simple|strong|fair|free|proud|
honest|brave|careful|early|late|happy|tired|ready|open|safe|large|small|new|old|clear|
important|beautiful""")
_WEATHER = ["sunny", "cloudy", "windy", "rainy", "cold", "warm", "foggy", "clear", "humid", "snowy"]
_COLORS = ["red", "blue", "green", "yellow", "black", "white", "gray", "brown", "orange", "purple"]
_ANIMALS = ["dog", "cat", "horse", "bird", "fox", "rabbit", "cow", "sheep", "duck", "owl", "bear", "deer"]
_FOODS = ["soup", "bread", "rice", "fish", "chicken", "salad", "pasta", "cheese", "apples", "eggs", "beans", "pie"]
_JOBS = ["teacher", "doctor", "farmer", "lawyer", "nurse", "engineer", "pilot", "baker", "writer", "soldier", "student", "carpenter"]
_CIVIC_NOUNS = _options("""freedom|liberty|justice|peace|democracy|the nation|our country|the republic|
the constitution|the people|our children|the future|the law|this land|our cities|the
government|the economy|our schools|the world|history|our history|the truth|our
freedom|our nation|the public""")
_CIVIC_VERBS = _options("""defend|protect|build|serve|honor|strengthen|renew|preserve|support|remember|
rebuild|improve|respect|trust|question|unite|lead|guard""")
_AUDIENCE = _options("""my fellow citizens|my friends|ladies and gentlemen|my fellow workers|
neighbors|friends and neighbors|members of congress|citizens of this great nation|
people of this city|my fellow countrymen""")
_GROUPS = _options("""the people|the voters|our leaders|the workers|the farmers|the students|young
people|our soldiers|the citizens|our neighbors|the families|the council|the senate|
the committee|the press|the public""")
_TOPICS = _options("""taxes|jobs|health care|education|housing|the budget|trade|energy|clean
water|public safety|the roads|the schools|the environment|the economy|foreign policy|
civil rights|veterans|small business|farming|space exploration""")


def _name(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.4:
        return rng.choice(_FIRST)
    if r < 0.8:
        return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    return f"{rng.choice(_TITLES)} {rng.choice(_LAST)}"


def _num(rng: random.Random, lo: int = 2, hi: int = 99) -> str:
    return number_words(rng.randint(lo, hi))


def _template(rng: random.Random) -> str:  # noqa: C901 - one big list of cases
    n, d, t, m = _name, _date_words, _time_words, _money_words
    c = rng.randrange(48)
    if c == 0:
        return f"{n(rng)} {rng.choice(_VERBS_PAST)} the {rng.choice(_OBJECTS)} at {rng.choice(_PLACES)}."
    if c == 1:
        return f"The meeting starts at {t(rng)} on {rng.choice(_DAYS)}."
    if c == 2:
        return f"We paid {m(rng)} for the {rng.choice(_OBJECTS)}."
    if c == 3:
        return f"{n(rng)} was born on {d(rng)}."
    if c == 4:
        return f"There are {_num(rng)} {rng.choice(_PLURALS)} in the {rng.choice(['room', 'garden', 'box', 'hall', 'building', 'village', 'report'])}."
    if c == 5:
        return f"The train to {rng.choice(_CITIES)} leaves at {t(rng)}."
    if c == 6:
        return f"Please call {n(rng)} before {t(rng)}."
    if c == 7:
        return f"It will be {rng.choice(_WEATHER)} in {rng.choice(_CITIES)} on {rng.choice(_DAYS)}."
    if c == 8:
        return f"The temperature dropped to {_num(rng, 0, 40)} degrees last night."
    if c == 9:
        return f"{n(rng)} moved to {rng.choice(_CITIES)} in {year_words(rng.randint(1900, 2025))}."
    if c == 10:
        return f"My phone number ends in {' '.join(_ONES[rng.randint(0, 9)] for _ in range(4))}."
    if c == 11:
        return f"The {rng.choice(_COLORS)} {rng.choice(_ANIMALS)} ran across the {rng.choice(['road', 'field', 'yard', 'street', 'bridge'])}."
    if c == 12:
        return f"I would like {rng.choice(['some', 'more', 'a bowl of', 'a plate of', 'fresh'])} {rng.choice(_FOODS)}, please."
    if c == 13:
        return f"{n(rng)} works as a {rng.choice(_JOBS)} in {rng.choice(_CITIES)}."
    if c == 14:
        return f"The price went up by {_num(rng, 2, 60)} percent this year."
    if c == 15:
        return f"Room {number_words(rng.randint(100, 999))} is on the {ordinal_words(rng.randint(1, 12))} floor."
    if c == 16:
        return f"Our flight was delayed by {_num(rng, 2, 59)} minutes."
    if c == 17:
        return f"{rng.choice(_AUDIENCE).capitalize()}, we must {rng.choice(_CIVIC_VERBS)} {rng.choice(_CIVIC_NOUNS)}."
    if c == 18:
        return f"Let us {rng.choice(_CIVIC_VERBS)} {rng.choice(_CIVIC_NOUNS)} and {rng.choice(_CIVIC_VERBS)} {rng.choice(_CIVIC_NOUNS)}."
    if c == 19:
        return f"{rng.choice(_GROUPS).capitalize()} {rng.choice(['asked', 'want', 'deserve', 'demand', 'expect'])} a {rng.choice(_ADJ)} answer on {rng.choice(_TOPICS)}."
    if c == 20:
        return f"The {rng.choice(['senate', 'council', 'committee', 'house', 'court', 'board'])} will vote on {rng.choice(_TOPICS)} on {d(rng)}."
    if c == 21:
        return f"We will not {rng.choice(['forget', 'abandon', 'ignore', 'give up on', 'walk away from'])} {rng.choice(_CIVIC_NOUNS)}."
    if c == 22:
        return f"{rng.choice(_CIVIC_NOUNS).capitalize()} is worth {rng.choice(['every sacrifice', 'our best effort', 'the hard work', 'the long struggle', 'fighting for'])}."
    if c == 23:
        return f"Today we {rng.choice(['celebrate', 'remember', 'honor', 'welcome'])} the {rng.choice(['men and women', 'workers', 'teachers', 'families', 'veterans', 'volunteers'])} who {rng.choice(['built', 'served', 'defended', 'rebuilt', 'strengthened'])} {rng.choice(_CIVIC_NOUNS)}."
    if c == 24:
        return f"Ask {rng.choice(['yourself', 'your neighbor', 'your teacher', 'the mayor', 'any worker', 'your family', n(rng)])} {rng.choice(['how we can help', 'where the station is', 'why the vote matters', 'when the office opens', 'what the plan is', 'which road to take', 'who will lead'])}."
    if c == 25:
        return f"I want to ask {rng.choice(['a question', 'you something', 'for your help', 'about the budget', 'about the schedule', 'for a favor'])}."
    if c == 26:
        return f"Our nation was founded on {rng.choice(['freedom', 'liberty', 'hope', 'hard work', 'courage', 'justice'])} and {rng.choice(['equality', 'faith in each other', 'the rule of law', 'opportunity', 'honest labor'])}."
    if c == 27:
        return f"The {rng.choice(['people', 'citizens', 'families', 'workers', 'children'])} of {rng.choice(['this country', 'our nation', 'this state', 'this city', rng.choice(_CITIES)])} {rng.choice(['deserve', 'need', 'want', 'have earned'])} {rng.choice(['better schools', 'good jobs', 'safe streets', 'a fair chance', 'clean air', 'honest leaders', 'a brighter future'])}."
    if c == 28:
        return f"In {year_words(rng.randint(1776, 2025))}, the country {rng.choice(['faced', 'overcame', 'entered', 'survived', 'remembered'])} a {rng.choice(['great', 'hard', 'long', 'difficult', 'new'])} {rng.choice(['challenge', 'war', 'crisis', 'era', 'winter', 'test'])}."
    if c == 29:
        return f"{n(rng)} said the {rng.choice(_OBJECTS)} costs {m(rng)}."
    if c == 30:
        return f"The store opens at {t(rng)} and closes at {t(rng)}."
    if c == 31:
        return f"{n(rng)} and {n(rng)} {rng.choice(['met', 'talked', 'had lunch', 'played chess', 'went walking'])} at {rng.choice(_PLACES)} on {rng.choice(_DAYS)}."
    if c == 32:
        return f"Add {_num(rng, 1, 12)} cups of flour and {_num(rng, 1, 6)} eggs to the bowl."
    if c == 33:
        return f"The bus to {rng.choice(_PLACES)} comes every {_num(rng, 5, 30)} minutes."
    if c == 34:
        return f"Turn {rng.choice(['left', 'right'])} at {rng.choice(_PLACES)} and walk {_num(rng, 1, 9)} blocks."
    if c == 35:
        return f"The {rng.choice(['report', 'package', 'letter', 'payment', 'order'])} is due on {d(rng)}."
    if c == 36:
        return f"{rng.choice(['Where', 'When', 'Why', 'How'])} did {n(rng)} {rng.choice(['find', 'buy', 'lose', 'fix', 'sell'])} the {rng.choice(_OBJECTS)}?"
    if c == 37:
        return f"What time does {rng.choice(_PLACES)} {rng.choice(['open', 'close'])} on {rng.choice(_DAYS)}?"
    if c == 38:
        return f"Can you {rng.choice(['bring', 'send', 'find', 'hold', 'carry'])} the {rng.choice(_OBJECTS)} to {rng.choice(_PLACES)}?"
    if c == 39:
        return f"The population of {rng.choice(_CITIES)} is about {_num(rng, 2, 900)} thousand."
    if c == 40:
        return f"{rng.choice(_GROUPS).capitalize()} {rng.choice(['voted', 'spoke', 'marched', 'worked', 'stood together'])} for {rng.choice(_CIVIC_NOUNS)}."
    if c == 41:
        return f"This is a {rng.choice(_ADJ)} day for {rng.choice(_CIVIC_NOUNS)}."
    if c == 42:
        return f"Together we can {rng.choice(_CIVIC_VERBS)} {rng.choice(_CIVIC_NOUNS)} for {rng.choice(['our children', 'the next generation', 'every family', 'all of us', 'years to come'])}."
    if c == 43:
        return f"The {rng.choice(['president', 'governor', 'mayor', 'senator', 'speaker'])} will speak to the nation at {t(rng)}."
    if c == 44:
        return f"{n(rng)} ran {_num(rng, 2, 26)} miles in {_num(rng, 2, 5)} hours."
    if c == 45:
        return f"I have {rng.choice(['read', 'written', 'counted', 'seen', 'answered'])} {_num(rng, 2, 300)} {rng.choice(_PLURALS)} so far."
    if c == 46:
        return f"The {rng.choice(_ANIMALS)} sleeps under the {rng.choice(_ADJ)} {rng.choice(['tree', 'porch', 'bridge', 'table', 'stairs'])}."
    return f"{n(rng)} {rng.choice(['thinks', 'believes', 'knows', 'hopes', 'says'])} that {rng.choice(_CIVIC_NOUNS)} {rng.choice(['matters', 'will last', 'comes first', 'belongs to everyone', 'needs our help'])}."


def template_sentences(rng: random.Random, n: int) -> list[str]:
    """``n`` attempts at template sentences (cleaned; duplicates possible)."""
    out = []
    for _ in range(n):
        s = clean_sentence(_template(rng))
        if s:
            out.append(s)
    return out


# ------------------------------------------------------------------------------------ corpus
@dataclass(frozen=True)
class SentenceSets:
    train: list[str]
    heldout: list[str]
    source: dict[str, str]  # sentence -> "fortune" | "wordnet" | "template"


class MissingTextSources(FastSLMError):
    """Debian's fortunes / WordNet files are not installed: the sentence lists would silently differ."""


# One file of each package the sentence lists read (fortunes-min, fortunes, wordnet-base).
_SOURCE_PROBES = ((FORTUNE_DIR, "fortunes"), (FORTUNE_DIR, "wisdom"), (WORDNET_DIR, "data.noun"))


def require_sources(fortune_dir: Path = FORTUNE_DIR, wordnet_dir: Path = WORDNET_DIR) -> None:
    """Raise MissingTextSources unless the text packages are installed (a partial set changes every split)."""
    probes = {FORTUNE_DIR: fortune_dir, WORDNET_DIR: wordnet_dir}
    missing = [str(probes[d] / name) for d, name in _SOURCE_PROBES if not (probes[d] / name).is_file()]
    if missing:
        raise MissingTextSources(f"{missing[0]} is missing: the demo corpus reads Debian's fortunes and WordNet; "
                                 "install them with `apt-get install -y fortunes-min fortunes wordnet-base`")


def load_sentences(
    seed: int = 0,
    max_fortune: int = 9000,
    max_wordnet: int = 7000,
    n_templates: int = 9000,
    fortune_dir: Path = FORTUNE_DIR,
    wordnet_dir: Path = WORDNET_DIR,
) -> SentenceSets:
    """All sources, deduplicated by :func:`normalize_key`, split by :func:`split_of`.

    Deterministic for a given seed and set of installed packages; both lists are shuffled with
    the seed. ``max_fortune`` / ``max_wordnet`` cap those sources (distinct sentences chosen
    with the seed) so that the total stays near 20k and the templates keep a fair share.
    """
    require_sources(Path(fortune_dir), Path(wordnet_dir))
    rng = random.Random(f"texts-{seed}")
    fortunes = sorted(set(fortune_sentences(fortune_dir)))
    rng.shuffle(fortunes)
    fortunes = fortunes[:max_fortune]
    wordnet = sorted(set(wordnet_sentences(wordnet_dir)))
    rng.shuffle(wordnet)
    wordnet = wordnet[:max_wordnet]
    templates = template_sentences(rng, n_templates)

    seen: set[str] = set()
    source: dict[str, str] = {}
    train: list[str] = []
    heldout: list[str] = []
    for name, items in (("fortune", fortunes), ("wordnet", wordnet), ("template", templates)):
        for s in items:
            key = normalize_key(s)
            if key in seen:
                continue
            seen.add(key)
            source[s] = name
            (heldout if split_of(s) == "heldout" else train).append(s)
    rng.shuffle(train)
    rng.shuffle(heldout)
    return SentenceSets(train=train, heldout=heldout, source=source)


if __name__ == "__main__":  # pragma: no cover - a quick look at the sets
    import collections
    import time

    t0 = time.time()
    sets = load_sentences()
    print(f"{time.time() - t0:.1f} s: train {len(sets.train)}  heldout {len(sets.heldout)}")
    print(collections.Counter(sets.source[s] for s in sets.train))
    print(collections.Counter(sets.source[s] for s in sets.heldout))
    r = random.Random(1)
    for s in r.sample(sets.train, 40):
        print(f"  [{sets.source[s]}] {s}")
