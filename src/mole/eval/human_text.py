"""Is a caption / prompt about people?  The rule behind COCO and DiffusionDB Human Prompts.

A text is about people when, after the parts that say nothing about the picture's subject are set aside, it has
- a person word (man, girls, skier, wizard, astronaut, ...; whole words, plurals and possessives), or
- a body-part word (face, hands, ...) in its first clause (the subject of a DiffusionDB prompt; later clauses are
  style tags such as "detailed face"), or
- the name of a person in its first clause: a common first name followed by another word ("bob odenkirk",
  "tom cruise") or a well-known single name ("putin", "beyonce", "jfk").
Set aside first: artist credits ("by greg rutkowski", "in the style of ...", a list of frequent DiffusionDB artist
names), negated mentions ("no people", "without humans", "no faces"), and "a couple of <thing>" ("a couple of
elephants" is not a couple). "portrait" alone is not a person (portraits of cats, of cities); animals dressed as
people ("anthropomorphic fox", "furry") are not people.
Measured on hand-labelled samples kept in tests/data/human_prompts_*_labelled.jsonl (bench/data_quality.py).
"""

from __future__ import annotations

import re
import unicodedata

PERSON_WORDS = (
    "man", "men", "woman", "women", "person", "persons", "people", "boy", "girl", "kid", "child", "children",
    "teenager", "teen", "baby", "babies", "toddler", "adult", "guy", "lady", "ladies", "gentleman", "gentlemen",
    "player", "skier", "surfer", "skateboarder", "snowboarder", "snow boarder", "boarder", "rider", "father",
    "mother", "dad", "mom", "mum", "mama", "grandma", "grandmother", "grandpa", "grandfather", "son", "daughter",
    "brother", "sister", "husband", "wife", "bride", "groom", "family", "families", "friend", "crowd", "human",
    "pedestrian", "worker", "chef", "cook", "baker", "doctor", "nurse", "soldier", "police", "policeman",
    "policemen", "officer", "student", "athlete", "actor", "actress", "king", "queen", "prince", "princess",
    "warrior", "knight", "businessman", "businessmen", "businesswoman", "someone", "somebody", "catcher", "batter",
    "pitcher", "umpire", "fan", "spectator", "tourist", "traveler", "traveller", "passenger", "vendor", "farmer",
    "cowboy", "cowgirl", "fisherman", "fishermen", "hunter", "villager", "witch", "wizard", "warlock", "sorcerer",
    "sorceress", "mage", "priest", "priestess", "monk", "nun", "pope", "samurai", "ninja", "geisha", "astronaut",
    "pilot", "sailor", "pirate", "mercenary", "assassin", "barbarian", "paladin", "adventurer", "explorer",
    "hacker", "superhero", "superheroes", "goddess", "mermaid", "elf", "elves", "dwarf", "dwarves", "witcher",
    "female", "male", "gunslinger", "detective", "scientist", "musician", "singer", "dancer", "ballerina", "boxer",
    "wrestler", "emperor", "empress", "president", "politician", "peasant", "merchant", "shepherd", "fighter",
    "thief", "bandit", "viking", "gladiator", "spartan", "cyclist", "biker", "jockey", "tennis player", "coach",
    "audience", "teacher", "waiter", "waitress", "bartender", "clown", "youth", "youngster", "infant", "newborn",
    "grandson", "granddaughter", "uncle", "aunt", "cousin", "individual", "duchess", "duke", "lord", "maiden",
    "couple", "she", "her", "fortune teller", "teller",
)  # fmt: skip
BODY_WORDS = ("face", "faces", "hand", "hands", "selfie", "headshot")
FIRST_NAMES = (
    "aaron adam adrian alan albert alex alexander alexandra alexandria alice alicia amanda amber amy andrea andrew "
    "angela angelina anna anne anthony antonio arnold ashley barack barbara barry ben benjamin bernie beth betty bill "
    "billie bob bobby brad bradley brandon brendan brian britney bruce bryan carl carlos carol caroline catherine "
    "charles charlie charlotte chris christian christina christopher chuck clint daniel danny dave david dennis diana "
    "donald doug dwayne ed eddie edward elizabeth ellen elon elvis emily emma emma eric ethan frank fred freddie "
    "gary george gerard gordon harrison harry heath helen henry hillary hugh ian isaac jack jackie jake james jane "
    "janet jared jason jeff jeffrey jennifer jenny jeremy jerry jessica jim jimmy joan joe joel john johnny jon "
    "jonathan jordan joseph josh julia julian justin kanye kate katherine keanu kevin kim kurt larry lady leonardo "
    "linda lisa liz louis lucy luke madison margaret margot maria marilyn mario martin mary matt matthew megan mel "
    "michael michelle mick mike morgan nancy natalie nathan nicholas nick nicolas nicole oliver olivia oprah paul "
    "peter phil philip rachel ralph richard rick robert robin rodney ron ronald ryan sam samuel sandra sarah scarlett "
    "scott sean selena sharon simon sophia stephen steve steven susan sylvester taylor ted terry thomas tim timothy "
    "tom tony vladimir walter will william winona zac zoe"
).split()
FAMOUS = (
    "trump", "putin", "obama", "biden", "beyonce", "jfk", "mrbeast", "rihanna", "shakira", "madonna", "zendaya",
    "eminem", "einstein", "napoleon", "gandhi", "stalin", "lenin", "churchill", "lincoln", "snoop dogg", "batman",
    "superman", "spiderman", "spider - man", "spider-man", "joker", "hermione", "gandalf", "geralt", "goku",
    "naruto", "darth vader", "jesus", "santa claus", "cleopatra", "mona lisa", "shakespeare", "elvis",
)  # fmt: skip
# artist names that appear in DiffusionDB prompts as style tags, with or without "by"
ARTISTS = (
    "greg rutkowski", "artgerm", "alphonse mucha", "wlop", "rhads", "jesper ejsing", "magali villeneuve",
    "ilya kuvshinov", "james jean", "krenz cushart", "stanley artgerm lau", "gaston bussiere", "ross tran",
    "peter mohrbacher", "craig mullins", "tooth wu", "donato giancola", "laurie greasley", "makoto shinkai",
    "jeremy mann", "ruan jia", "charlie bowater", "edward hopper", "frank frazetta", "james gurney",
    "greg manchess", "artem demura", "james gilleard", "simon stalenhag", "jordan grimmer", "gil elvgren",
    "dan mumford", "lois van baarle", "norman rockwell", "tom bagshaw", "karol bak", "wayne barlowe",
    "john collier", "anders zorn", "francis bacon", "michael whelan", "jean delville", "greg tocchini",
    "annie leibovitz", "albert aublet", "salvador dali", "mandy jurgens", "hayao miyazaki", "joe fenton",
    "tyler edlin", "mark ryden", "greg hildebrandt", "tim hildebrandt", "justin gerard", "eddie mendoza",
    "marc adamus", "gerhard richter", "ridley scott", "albert bierstadt", "lisa frank", "alexander mcqueen",
    "pete mohrbacher", "john berkey", "chris riddell", "bruce pennington", "john harris", "noah bradley",
    "jack kirby", "denis villeneuve", "jim burns", "mark brooks", "john howe", "ted nasmith", "michael komarck",
    "ashley wood", "wes anderson", "roger dean", "jeremy lipking", "jeremy lipkin", "michael garmash", "rob rey",
    "stephen bliss", "sargent", "leyendecker", "ian fisher", "isaac levitan", "ivan shishkin", "carl larsson",
    "leonardo da vinci", "thomas kinkade", "gregory crewdson", "alex ross", "bill sienkiewicz",
)  # fmt: skip
NOT_PEOPLE = ("anthropomorphic", "anthro", "furry", "fursona")
# a person word used as a modifier of a thing ("passenger bus", "baby giraffe", "iron man suit", "hand formed"), or
# as the material of a thing ("skull of a pirate", "statue of a king"), is not a person in the picture
THING_AFTER = (
    "bus", "buses", "train", "plane", "jet", "car", "seat", "seats", "giraffe", "elephant", "zebra", "bear", "cow",
    "sheep", "horse", "bird", "animal", "duck", "goat", "dog", "cat", "pig", "deer", "uniform", "uniforms", "suit",
    "costume", "doll", "figure", "figurine", "statue", "mask", "toy", "skull", "hybrid", "formed", "made", "painted",
    "drawn", "written", "crafted", "carved",
)  # fmt: skip
THING_BEFORE = ("skull of a", "skull of", "statue of a", "statue of", "robotic", "robot", "toy", "lego")
NEGATION = r"(?:no|without|not any|devoid of|empty of|free of|zero)\s+(?:\w+\s+)?"


def _plural(w: str) -> str:
    if " " in w or w.endswith(("men", "ren", "ple", "ies", "ves", "es")) or w in ("police", "crowd", "youth"):
        return re.escape(w).replace(r"\ ", r"\s+")
    return re.escape(w) + "s?"


def _words(ws) -> str:
    return r"\b(?:" + "|".join(sorted((_plural(w) for w in ws), key=len, reverse=True)) + r")(?:'s|s')?\b"


_PERSON = re.compile(_words(PERSON_WORDS), re.IGNORECASE)
_BODY = re.compile(_words(BODY_WORDS), re.IGNORECASE)
_FAMOUS = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in FAMOUS) + r")\b", re.IGNORECASE)
_FIRST = re.compile(r"\b(?:" + "|".join(FIRST_NAMES) + r")\s+(?!and\b|or\b|with\b|as\b|in\b|of\b|the\b|a\b)[a-z]{2,}",
                    re.IGNORECASE)  # fmt: skip
_ARTIST = re.compile(r"\b(?:" + "|".join(re.escape(a) for a in ARTISTS) + r")\b", re.IGNORECASE)
_CREDIT = re.compile(r"\b(?:(?:art|painted|drawn|illustrated|photographed|sculpted)\s+)?by\s+[^,.;|!]*"
                     r"|\b(?:in\s+)?(?:the\s+)?style\s+of\s+[^,.;|!]*", re.IGNORECASE)  # fmt: skip
_COUPLE_OF = re.compile(r"\bcouple\s+of\b", re.IGNORECASE)
_NOT_PEOPLE = re.compile(r"\b(?:" + "|".join(NOT_PEOPLE) + r")\b", re.IGNORECASE)


def _fold(text: str) -> str:
    """Lower case, accents off (beyoncé -> beyonce), one space between words."""
    t = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return " ".join(t.lower().split())


_THING_AFTER = re.compile(r"\s*(?:" + "|".join(THING_AFTER) + r")\b")
_THING_BEFORE = re.compile(r"\b(?:" + "|".join(THING_BEFORE) + r")\s*$")
_NEGATED = re.compile(r"\b" + NEGATION + r"$")


def _real_match(pattern: re.Pattern, text: str) -> re.Match | None:
    """A match that is not negated ("no people"), not a modifier ("passenger bus") and not a thing's material."""
    for m in pattern.finditer(text):
        before = text[max(0, m.start() - 24) : m.start()]
        if _NEGATED.search(before) or _THING_BEFORE.search(before) or _THING_AFTER.match(text, m.end()):
            continue
        return m
    return None


def human_evidence(text: str) -> str | None:
    """What makes `text` about people ("person word 'girl'", "name 'tom cruise'", ...), or None."""
    t = _fold(text)
    t = _ARTIST.sub(" ", _CREDIT.sub(" ", t))
    t = _COUPLE_OF.sub("two", t)
    if _NOT_PEOPLE.search(t):
        return None
    head = re.split(r"[,.;|!:\n]", t, maxsplit=1)[0]
    for pattern, scope, what in ((_PERSON, t, "person word"), (_BODY, head, "body part"), (_FAMOUS, head, "name"),
                                 (_FIRST, head, "name")):  # fmt: skip
        m = _real_match(pattern, scope)
        if m is not None:
            return f"{what} {m.group(0)!r}"
    return None


def is_human_text(text: str) -> bool:
    return human_evidence(text) is not None
