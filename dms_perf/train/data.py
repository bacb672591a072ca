"""Training text for the small Qwen3 base models, generated offline from a seed (docs/models.md).

Everything here is written for this project (MIT-licensed with it, like the rest of this package's
code): word lists, a small sentence grammar and the fact/question templates. Nothing is read from disk
or the network, so every machine produces the same text from the same seed.

Two kinds of documents, each exactly ``length`` token ids (parts are tokenized separately and joined,
as ``dms_perf.bench.workloads`` builds its prompts, so the length is exact):

* **retrieval**: story prose with 1-4 *facts* planted at random depths ("The access code for the
  amber gate is 4821-MAPLE."), then questions about some of them, each answered right after its cue
  (``"\\nAnswer: 4821-MAPLE"``). Keys are random names or things; values are random codes. Facts about
  other keys are the distractors.
* **prose**: the same story prose with no fact, plain language-model text.

Held out of training (``HELDOUT_*`` here, and the suite's ``FILLER`` / ``NEEDLE`` / ``QUESTION`` in
``dms_perf.bench.workloads``): fact and question phrasings, filler sentences and code words that the
training generator cannot produce. ``heldout_prompt`` builds an evaluation prompt from them;
``tests/train/test_data.py`` checks that none of them can come out of the training generator.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from dataclasses import dataclass

import torch

EOS = "<|endoftext|>"

# ---------------------------------------------------------------------------------------------- words
FIRST_NAMES = """Ada Alba Alma Anya Arlo Basil Bea Bram Cara Cleo Cyrus Dara Dell Edda Elio Emil Enzo Esme
Ezra Faye Felix Fern Finn Greta Gus Hana Hugo Ines Ira Isak Ivo Jana Jude Juno Kai Kira Lars Lena Leo Lia
Lina Lior Lise Lotte Luca Mara Maren Mika Milo Mira Nell Nico Nina Noor Odin Olga Omar Otto Pia Quinn Rafa
Remy Rhea Rosa Rune Sami Sana Silas Suri Tam Tessa Theo Tova Ugo Una Vera Vito Wren Yara Yusuf Zara Zeno""".split()
SURNAMES = """Abbot Ashdown Bellamy Birch Calder Carrow Dane Delacroix Ellery Farrow Fenwick Garnet Gaunt
Hadley Hale Holloway Ingram Jessop Kell Kestrel Lark Lowell Marlow Mercer Moss Nadir Norwood Oakes Orla
Pell Penrose Quill Radley Renner Sallow Sorensen Strand Tarrant Thorne Upton Vance Voss Wexley Whitlock
Yates Yorke Zamora""".split()
COLORS = "red green amber silver golden grey violet black white orange brown crimson pale dark blue yellow".split()
# Things a fact's key can name ("the amber gate") and the story's objects.
THINGS = """gate box lamp chest drawer cabinet locker vault crate trunk safe shed garage cellar attic
studio cabin tent barrel bucket basket kettle clock radio bicycle wagon boat tractor engine pump valve
door window panel switch ladder bench table shelf cupboard""".split()
NOUNS = """apple bottle blanket book brush candle card chair coat cup desk drum envelope fence flag
glove hammer hat jacket jar key kite knife lantern letter map mirror nail needle notebook paint pan
pencil pillow plate pot rope saw scarf shoe spoon stamp stone string teapot ticket tool towel toy
umbrella vase wallet wheel whistle""".split()
ADJECTIVES = """old new small large heavy light quiet loud clean dusty warm cold bright narrow wide
round square soft hard smooth rough cheap rare simple strange careful happy tired busy calm eager
gentle honest lucky proud shy steady clever""".split()
PLACES = """market station garden kitchen workshop school office river bridge square hall farm mill
tower yard shop bakery field orchard barn stable wharf quarry forge depot clinic theatre gallery
warehouse courtyard""".split()
TRANSITIVE = """opened closed carried painted found moved cleaned checked fixed watched locked lifted
measured repaired counted sorted wrapped polished packed borrowed returned dropped hid filled emptied
weighed labelled carved""".split()
INTRANSITIVE = """waited laughed slept arrived left worked rested listened smiled hurried wandered
whistled paused stayed returned shivered nodded""".split()
ADVERBS = "slowly quickly quietly carefully happily early late suddenly twice again briefly".split()
TIMES = """morning afternoon evening night dawn noon dusk""".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
WEATHER = "windy rainy sunny foggy cloudy frosty humid mild stormy clear".split()
MEALS = "breakfast lunch dinner supper tea".split()
NUMBER_WORDS = "two three four five six seven eight nine ten eleven twelve".split()
SYLLABLES = "bren wick dal mor ton ash ford hol ven kir lan sta bury mere thorn wyn cal dor ril stead".split()
# Code words of the training values (upper case, as in "4821-MAPLE"); flowers are kept for held-out codes.
# Half of the worded codes take a random upper-case string instead (``random_code_word``): copying a code must
# work for words the model never saw, such as the suite's flowers, not only for these.
CODE_WORDS = """MAPLE CEDAR BIRCH ALDER WILLOW ASPEN LARCH HAZEL RAVEN FALCON HERON OTTER BADGER LYNX
COBALT QUARTZ GRANITE AMBER ONYX JADE COPPER NICKEL ZINC SILVER COMET ORBIT NOVA DELTA SIGMA KAPPA
TIGER PANDA ZEBRA BISON MOOSE CANYON RIVER SUMMIT HARBOR ISLAND ANCHOR COMPASS LANTERN BEACON""".split()

# Fact attributes. "secret code" and the question "... Reply with the code only." are the suite's needle
# phrasing (dms_perf.bench.workloads): the suite's needle workload is in the training distribution, its FILLER
# prose and its flower code words are not; the held-out set below keeps a phrasing the model never saw.
ATTRIBUTES = """code|access code|secret code|password|pin|number|passcode|combination|serial number
|reference number|ticket number|locker code|key code|tag|label""".replace("\n", "").split("|")

# ------------------------------------------------------------------------------------- templates
# {key} is the key as written mid-sentence, {Key} capitalized; {attr} the attribute; {value} the code.
FACT_TEMPLATES = (
    "The {attr} for {key} is {value}.",
    "The {attr} of {key} is {value}.",
    "{Key} has the {attr} {value}.",
    "Note that the {attr} for {key} is {value}.",
    "Remember this: the {attr} of {key} is {value}.",
    "For {key}, the {attr} is {value}.",
    "{Key} was given the {attr} {value}.",
    "Someone wrote down that the {attr} of {key} was {value}.",
    "The {attr} used for {key} is {value}, and it has not changed.",
    "Important: {key} uses the {attr} {value}.",
)
QUESTION_TEMPLATES = (
    "What is the {attr} for {key}?",
    "What is the {attr} of {key}?",
    "Which {attr} does {key} have?",
    "What {attr} was given to {key}?",
    "Tell me the {attr} of {key}.",
    "What is the {attr} for {key}? Give only the {attr}.",
    "What is the {attr} of {key}? Answer with the {attr} alone.",
    "Which {attr} belongs to {key}?",
    "What is the {attr} for {key}? Reply with the {kind} only.",
)
# (before the first question, before its answer); later questions follow on new lines.
ANSWER_CUES = (
    ("\n\nQuestion: ", "\nAnswer:"),
    ("\n\n", "\nAnswer:"),
    ("\n\nQ: ", "\nA:"),
    ("\n", " Answer:"),
)

# Held out: never produced by the training generator (tests/train/test_data.py).
HELDOUT_FACT_TEMPLATES = (
    "Keep this in mind: the {attr} assigned to {key} reads {value}.",
    "Written on a card was the {attr} of {key}: {value}.",
    "It turned out that {key} had been issued the {attr} {value} last year.",
)
HELDOUT_QUESTION_TEMPLATES = (
    "Which {attr} was assigned to {key}? State it and nothing else.",
    "Recall the {attr} of {key}. Respond with just that.",
)
HELDOUT_ATTRIBUTES = ("vault code", "entry code", "door code")
HELDOUT_CODE_WORDS = """ORCHID TULIP LILAC ASTER DAHLIA IRIS LOTUS POPPY JASMINE PEONY MAGNOLIA
VIOLET""".split()
# Held-out filler prose (original, about an observatory; other vocabulary than the training grammar).
HELDOUT_FILLER = (
    " The observatory dome creaked as it turned toward the eastern sky.",
    " Astronomers adjusted the telescope and logged faint variable stars.",
    " A thermos of coffee steamed beside the humming spectrograph.",
    " Through the slit, Jupiter's moons drifted across the eyepiece.",
    " The technician recalibrated sensors after midnight, yawning often.",
    " Snow covered the access road, so supplies arrived by helicopter.",
    " Photographs of distant galaxies hung along the corridor walls.",
    " Someone's playlist of symphonies echoed through the control room.",
    " Clouds rolled in before dawn and the instruments were parked.",
    " Graduate students debated whether the comet's tail had brightened.",
    " The director reviewed proposals for next season's observing runs.",
    " Frost formed on the mirrors whenever humidity climbed too high.",
)


def training_words() -> set[str]:
    """Every word the training generator can write, lower case, apart from generated numbers, town names
    (``SYLLABLES`` joined) and codes: the words of the lists and of the templates' fixed text."""
    words: set[str] = set()
    lists = (FIRST_NAMES, SURNAMES, COLORS, THINGS, NOUNS, ADJECTIVES, PLACES, TRANSITIVE, INTRANSITIVE, ADVERBS,
             TIMES, DAYS, WEATHER, MEALS, NUMBER_WORDS, ATTRIBUTES, [_plural(n) for n in NOUNS + THINGS])
    for items in lists:
        for item in items:
            words.update(_words(item))
    for text in (*FACT_TEMPLATES, *QUESTION_TEMPLATES, *(a + b for a, b in ANSWER_CUES), *PROSE_TEMPLATES,
                 *KEY_TEMPLATES):
        words.update(_words(text))
    return words


def _words(text: str) -> list[str]:
    cleaned = "".join(c if c.isalnum() or c in "'{}" else " " for c in text)
    return [w.lower() for w in cleaned.split() if "{" not in w]


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith("fe"):
        return noun[:-2] + "ves"
    return noun + "s"


# ----------------------------------------------------------------------------------------- grammar
# Story sentences: {P} and {Q} are two of the document's cast, {Town} its town; the other slots are
# filled from the lists above. Characters recur within a document, so the prose itself rewards copying.
PROSE_TEMPLATES = (
    "{P} {transitive} the {adjective} {noun} in the {place}.",
    "{P} {intransitive} {adverb} near the {place}.",
    "In the {time}, {P} walked to the {place} with {Q}.",
    "The {adjective} {noun} was still on the {thing} when {P} came back.",
    "{P} and {Q} talked about the {noun} for a while.",
    "{P} bought {count} {nouns} at the {place} on {day}.",
    "It was {weather} in {Town} that {time}, and the {place} was {adjective}.",
    "{P} wrote a letter to {Q} about the {adjective} {noun}.",
    "Nobody knew why the {noun} in the {place} was so {adjective}.",
    "At {clock}, {P} {transitive} the {thing} and {intransitive}.",
    "{Q} said the {noun} was {adjective}, but {P} did not agree.",
    "After {meal}, {P} {transitive} {count} {nouns}.",
    "The {place} in {Town} opened at {clock} every {day}.",
    "{P} kept a {adjective} {noun} in the {color} {thing}.",
    "{Q} {intransitive} while {P} {transitive} the {noun}.",
    "There were {number} {nouns} in the {place} that {time}.",
    "{P} asked {Q} to bring the {noun} to the {place}.",
    "By {time}, the {adjective} {thing} had been {transitive}.",
    "{P} had lived in {Town} for {number} years.",
    "On {day}, {Q} {transitive} the {color} {noun} {adverb}.",
    "The {thing} near the {place} was {color} and {adjective}.",
    "{P} found {count} {nouns} behind the {thing}.",
    "Later, {Q} {intransitive} at the {place} until {clock}.",
    "{P} thought the {place} looked {adjective} in the {time}.",
)
# Keys of facts: "{Name} {Surname}", "the {color} {thing}", "the {thing} in the {place}", ...
KEY_TEMPLATES = ("{name}", "the {color} {thing}", "the {thing} in the {place}", "the {thing} of {name}",
                 "the {adjective} {thing}", "{thing} {number}")


@dataclass(frozen=True)
class Fact:
    key: str
    attribute: str
    value: str

    def sentence(self, template: str) -> str:
        return template.format(key=self.key, Key=_capitalized(self.key), attr=self.attribute, value=self.value,
                               kind=self.attribute.split()[-1])


def random_code_word(rng: random.Random) -> str:
    """3 to 8 random upper-case letters, never holding a held-out code word (``HELDOUT_CODE_WORDS``)."""
    while True:
        word = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(3, 8)))
        if not any(held in word for held in HELDOUT_CODE_WORDS):
            return word


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


class TextGenerator:
    """Seeded generator of training text: ``document``, ``prose_sentences``, ``fact``; ``heldout=True``
    draws facts from the held-out attributes and code words instead (evaluation only)."""

    def __init__(self, seed: int, *, heldout: bool = False):
        self.rng = random.Random(seed)
        self.heldout = heldout
        self.new_cast()

    def new_cast(self) -> None:
        """A new set of characters and a town for the next document."""
        r = self.rng
        self.cast = [r.choice(FIRST_NAMES) for _ in range(4)]
        self.town = "".join(r.choice(SYLLABLES) for _ in range(r.randint(2, 3))).capitalize()

    # -- prose
    def prose_sentence(self) -> str:
        r = self.rng
        p, q = r.sample(self.cast, 2)
        slots = dict(
            P=p, Q=q, Town=self.town, transitive=r.choice(TRANSITIVE), intransitive=r.choice(INTRANSITIVE),
            adjective=r.choice(ADJECTIVES), noun=r.choice(NOUNS), nouns=_plural(r.choice(NOUNS)),
            place=r.choice(PLACES), thing=r.choice(THINGS), adverb=r.choice(ADVERBS), time=r.choice(TIMES),
            day=r.choice(DAYS), weather=r.choice(WEATHER), meal=r.choice(MEALS), color=r.choice(COLORS),
            count=r.choice(NUMBER_WORDS), number=str(r.randint(2, 90)),
            clock=f"{r.randint(1, 12)}:{r.choice(('00', '15', '30', '45'))}",
        )
        return _capitalized(r.choice(PROSE_TEMPLATES).format(**slots))

    # -- facts
    def key(self) -> str:
        r = self.rng
        template = r.choice(KEY_TEMPLATES)
        return template.format(
            name=f"{r.choice(FIRST_NAMES)} {r.choice(SURNAMES)}", color=r.choice(COLORS), thing=r.choice(THINGS),
            place=r.choice(PLACES), adjective=r.choice(ADJECTIVES), number=r.randint(2, 999),
        )

    def value(self) -> str:
        r = self.rng
        digits = str(r.randint(1000, 9999))
        kind = r.random()
        if self.heldout:
            return f"{digits}-{r.choice(HELDOUT_CODE_WORDS)}"
        word = r.choice(CODE_WORDS) if r.random() < 0.5 else random_code_word(r)
        if kind < 0.45:
            return f"{digits}-{word}"
        if kind < 0.65:
            return str(r.randint(100, 9_999_999))
        if kind < 0.8:
            return f"{word}-{r.randint(10, 999)}"
        if kind < 0.9:
            return f"{r.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{r.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{digits}"
        return f"{r.randint(10, 99)}-{r.randint(100, 999)}-{r.randint(10, 99)}"

    def facts(self, n: int) -> list[Fact]:
        """``n`` facts with distinct keys, one attribute (so only the key tells them apart) and distinct values."""
        attribute = self.rng.choice(HELDOUT_ATTRIBUTES if self.heldout else ATTRIBUTES)
        keys: list[str] = []
        while len(keys) < n:
            k = self.key()
            if k not in keys:
                keys.append(k)
        values: list[str] = []
        while len(values) < n:
            v = self.value()
            if v not in values:
                values.append(v)
        return [Fact(k, attribute, v) for k, v in zip(keys, values, strict=True)]


@dataclass(frozen=True)
class Mix:
    """What a training batch holds: ``retrieval`` fraction of retrieval documents (the rest prose), with
    1 to ``max_facts`` facts (at most one per ``fact_spacing`` tokens) and 1 to ``max_questions`` questions
    each."""

    retrieval: float = 0.85
    max_facts: int = 4
    max_questions: int = 3
    fact_spacing: int = 64


class Corpus:
    """Token-id documents of exact lengths from a seeded ``TextGenerator`` and a tokenizer.

    ``tokenizer``: a ``tokenizers.Tokenizer`` or a transformers tokenizer (its ``backend_tokenizer`` is
    used). The same (seed, tokenizer, calls) give the same ids.
    """

    def __init__(self, tokenizer, seed: int, mix: Mix = Mix()):
        self.tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self.text = TextGenerator(seed)
        self.rng = self.text.rng
        self.mix = mix
        self.eos_id = self.tokenizer.token_to_id(EOS)
        if self.eos_id is None:
            raise ValueError(f"the tokenizer has no {EOS!r} token")

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def prose(self, budget: int) -> tuple[list[int], list[int]]:
        """At least ``budget`` ids of prose (whole sentences, paragraphs of 3-8 sentences), not cut, and the
        index where each sentence starts."""
        ids: list[int] = []
        starts: list[int] = []
        while len(ids) < budget:
            count = self.rng.randint(3, 8)
            texts = [self.text.prose_sentence() for _ in range(count)]
            texts = ["\n\n" + texts[0] if ids else " " + texts[0]] + [" " + t for t in texts[1:]]
            for piece in self.encode_many(texts):
                starts.append(len(ids))
                ids += piece
        return ids, starts

    def prose_document(self, length: int) -> list[int]:
        self.text.new_cast()
        return self.prose(length)[0][:length]

    def retrieval_document(self, length: int) -> list[int]:
        """Prose with facts at random depths, then questions on some facts with their answers, then EOS;
        exactly ``length`` ids (at least 128; facts are dropped until they fit)."""
        r, mix = self.rng, self.mix
        self.text.new_cast()
        count = r.randint(1, max(1, min(mix.max_facts, length // mix.fact_spacing)))
        while True:
            facts = self.text.facts(count)
            asked = r.sample(facts, r.randint(1, min(mix.max_questions, len(facts))))
            fact_ids = self.encode_many([" " + f.sentence(r.choice(FACT_TEMPLATES)) for f in facts])
            opening, cue = r.choice(ANSWER_CUES)
            tail_texts = []
            for i, fact in enumerate(asked):
                question = fact.sentence(r.choice(QUESTION_TEMPLATES))
                tail_texts += [(opening if i == 0 else "\n") + question + cue, f" {fact.value}\n"]
            pieces = self.encode_many(tail_texts)
            tail = [t for piece in pieces for t in piece] + [self.eos_id]
            # The answers' ids (every other piece of the tail), flagged for the loss weight (pretrain.Recipe).
            tail_answers = [i % 2 == 1 for i, piece in enumerate(pieces) for _ in piece] + [False]
            budget = length - len(tail) - sum(map(len, fact_ids))
            if budget >= 0:
                break
            if count == 1:
                raise ValueError(f"length {length} is too short for a fact and its question")
            count -= 1  # drawn too long: fewer facts
        filler, starts = self.prose(budget)
        filler = filler[:budget]
        # Facts at random depths of the filler, each at the sentence start at or before its depth.
        depths = [r.randint(0, budget) for _ in facts]
        cuts = sorted(max((s for s in starts if s <= depth), default=0) for depth in depths)
        body: list[int] = []
        at = 0
        for cut, ids in zip(cuts, fact_ids, strict=True):
            body += filler[at:cut] + ids
            at = cut
        ids = body + filler[at:] + tail
        self.answers = [False] * (len(ids) - len(tail)) + tail_answers
        return ids

    def document(self, length: int) -> list[int]:
        """A retrieval document (fraction ``mix.retrieval``) or prose; ``self.answers`` then flags its answer ids."""
        if self.rng.random() < self.mix.retrieval:
            return self.retrieval_document(length)
        ids = self.prose_document(length)
        self.answers = [False] * length
        return ids

    def batch(self, length: int, size: int) -> torch.Tensor:
        """[size, length] int64 ids."""
        return self.batch_with_answers(length, size)[0]

    def batch_with_answers(self, length: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[size, length] int64 ids and [size, length] bool, True at the ids of answers."""
        ids, answers = [], []
        for _ in range(size):
            ids.append(self.document(length))
            answers.append(self.answers)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(answers, dtype=torch.bool)


def tokenizer_corpus(seed: int, documents: int = 3000) -> Iterator[str]:
    """Text to train the tokenizer on: retrieval-style and prose documents of the training generator."""
    text = TextGenerator(seed)
    for i in range(documents):
        text.new_cast()
        sentences = [text.prose_sentence() for _ in range(20)]
        if i % 2 == 0:
            facts = text.facts(text.rng.randint(1, 4))
            sentences += [f.sentence(text.rng.choice(FACT_TEMPLATES)) for f in facts]
            opening, cue = text.rng.choice(ANSWER_CUES)
            fact = text.rng.choice(facts)
            sentences.append(opening + fact.sentence(text.rng.choice(QUESTION_TEMPLATES)) + cue + f" {fact.value}\n")
        yield " ".join(sentences)
