"""Spoken-question answering (SQQA) rules of the demo model, derived from the transcript.

Text normalisation (the only one used here):

    words(t) = the whitespace tokens of ``t``, lower-cased, with every character other than
               a-z, 0-9, apostrophe and hyphen removed, then leading / trailing apostrophes and
               hyphens stripped; tokens left empty are dropped.

    "Don't panic, Mister Smith!" -> ["don't", "panic", "mister", "smith"]

Question types (each has a few phrasings; :func:`answer` accepts all of them, case-insensitive):

=========  ==========================================  ==============================
type       phrasings                                   answer
=========  ==========================================  ==============================
first      What is the first word? / Which word        words[0]
           comes first?
last       What is the last word? / Which word         words[-1]
           comes last?
count      How many words were said? / How many        str(len(words)), digits: "7"
           words are in the recording?
summary    Summarize in three words. / Give a          the first three DISTINCT words
           three word summary.                         that are not in STOPWORDS, in the
                                                       order spoken, joined by spaces; if
                                                       fewer than three exist, the
                                                       earliest other distinct words fill
                                                       up, still in spoken order
contains   Is the word X said? / Was the word X        "yes" if X is in words else "no"
           said?
=========  ==========================================  ==============================

Answers are lower-case, without punctuation.
"""

from __future__ import annotations

import random
import re

STOPWORDS = frozenset(
    """
    a an the and or but nor so yet if then than that this these those there here
    i me my mine myself we us our ours ourselves you your yours yourself yourselves
    he him his himself she her hers herself it its itself they them their theirs themselves
    is am are was were be been being have has had having do does did doing done
    will would shall should can could may might must
    to of in on at by for with about against between into through during before after above
    below from up down out off over under again further once
    what which who whom whose when where why how all any both each few more most other some
    such no not only own same too very just also as until while because
    s t don't can't won't isn't aren't wasn't weren't i'm you're we're they're it's that's
    let's there's he's she's i've we've you've i'll we'll you'll i'd we'd you'd
    """.split()
)

# Distractors for "Is the word X said?" questions whose answer is "no".
DISTRACTORS = tuple(
    """
    apple river music window garden winter summer doctor teacher money freedom nation
    country city train ticket market morning evening friday monday letter dollar
    question answer water mountain island paper table chair house family children people
    forest ocean horse bird dog cat bread coffee library station airport hospital
    office school report bridge street village history future justice peace election
    government senator president captain number seven twelve hundred thousand yellow
    green purple silver golden quiet bright happy simple strong honest careful early
    """.split()
)

_DROP = re.compile(r"[^a-z0-9'-]+")

FIRST_Q = ("What is the first word?", "Which word comes first?")
LAST_Q = ("What is the last word?", "Which word comes last?")
COUNT_Q = ("How many words were said?", "How many words are in the recording?")
SUMMARY_Q = ("Summarize in three words.", "Give a three word summary.")
CONTAINS_Q = ("Is the word {w} said?", "Was the word {w} said?")

_CONTAINS_RE = re.compile(r"^(?:is|was) the word (\S+) said\?$")
QUESTION_TYPES = ("first", "last", "count", "summary", "contains")


def question_type(question: str) -> str:
    """The type (one of QUESTION_TYPES) of a question in one of the supported phrasings."""
    q = question.strip().lower()
    for name, phrasings in (("first", FIRST_Q), ("last", LAST_Q), ("count", COUNT_Q), ("summary", SUMMARY_Q)):
        if q in (p.lower() for p in phrasings):
            return name
    return "contains"


def words(transcript: str) -> list[str]:
    """The project's word list of a transcript (see the module docstring)."""
    out = []
    for tok in transcript.lower().split():
        tok = _DROP.sub("", tok).strip("'-")
        if tok:
            out.append(tok)
    return out


def content_words(transcript: str) -> list[str]:
    """The distinct words of a transcript that are not in STOPWORDS, in the order spoken."""
    return [w for w in dict.fromkeys(words(transcript)) if w not in STOPWORDS]


def summary(transcript: str) -> str:
    """The three-word summary rule (see the module docstring)."""
    distinct = list(dict.fromkeys(words(transcript)))  # first occurrences, in spoken order
    chosen = set(content_words(transcript)[:3])
    chosen |= set([w for w in distinct if w not in chosen][: 3 - len(chosen)])
    return " ".join(w for w in distinct if w in chosen)


def answer(question: str, transcript: str) -> str:
    """The correct answer to one of the supported questions about ``transcript``."""
    q = " ".join(question.strip().split())
    ql = q.lower()
    ws = words(transcript)
    if ql in (s.lower() for s in FIRST_Q):
        return ws[0] if ws else ""
    if ql in (s.lower() for s in LAST_Q):
        return ws[-1] if ws else ""
    if ql in (s.lower() for s in COUNT_Q):
        return str(len(ws))
    if ql in (s.lower() for s in SUMMARY_Q):
        return summary(transcript)
    m = _CONTAINS_RE.match(ql)
    if m:
        target = words(m.group(1))
        return "yes" if target and target[0] in ws else "no"
    raise ValueError(f"unsupported question: {question!r}")


def questions_for(transcript: str, rng: random.Random, distractors: tuple[str, ...] = DISTRACTORS) -> list[tuple[str, str]]:
    """One (question, answer) pair of each type for ``transcript``, phrasing chosen by ``rng``.

    The "contains" question asks about a word of the transcript (preferably not a stopword)
    or, with probability 1/2, about a distractor that is not in it (answer "no").
    """
    ws = words(transcript)
    if not ws:
        return []
    qs = [rng.choice(FIRST_Q), rng.choice(LAST_Q), rng.choice(COUNT_Q), rng.choice(SUMMARY_Q)]
    present = set(ws)
    absent = [w for w in distractors if w not in present]
    if absent and rng.random() < 0.5:
        target = rng.choice(absent)
    else:
        content = [w for w in ws if w not in STOPWORDS] or ws
        target = rng.choice(content)
    qs.append(rng.choice(CONTAINS_Q).format(w=target))
    return [(q, answer(q, transcript)) for q in qs]
