"""The demo world's synthetic instruction mixture, base (pre-training) split and evaluation prompts.

Fifteen task families modelled on the paper's atom table (Appendix C). Each family has several
prompt templates and draws its words from `vocab.py`; each has a response STYLE that is distinctive
and consistent (how the model responds, not what about), so that families are separable in gradient
space. Five families carry the five steered behaviours and are deliberately mixed, so that none is
all-or-nothing (headroom for steering):

| family        | behaviour | mix in the training data (by template)                                |
|---------------|-----------|------------------------------------------------------------------------|
| yes_no        | yes_no    | ~60% first line Yes/No/True/False, ~40% a plain sentence               |
| code          | code      | ~65% a ``` fenced block, ~35% a prose explanation                      |
| bullets       | bullets   | ~60% bulleted lines, ~25% prose, ~15% numbered lines                   |
| numbered      | numbered  | ~65% numbered lines, ~35% prose ("First, ... Then, ... Finally, ...")  |
| missing_input | refusal   | ~65% "Please provide ..."-style clarification, ~35% a guess            |

The other ten families are deterministic (one response format each; `formats.FORMAT_CHECKS`).

Everything is deterministic by seed. Templates and vocabulary are split: the mixture uses training
templates and the training part of every word table; evaluation prompts use HELD-OUT templates and
the held-out part of the vocabulary.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ga_ray.demo import vocab as V
from ga_ray.demo.vocab import Vocab, pick

DETERMINISTIC_FAMILIES = (
    "factual_qa",
    "grammar",
    "arithmetic",
    "multistep",
    "classification",
    "sentiment",
    "transform",
    "summarise",
    "creative",
    "word_task",
)
BEHAVIOUR_FAMILIES = {  # behaviour -> the family that carries it
    "yes_no": "yes_no",
    "code": "code",
    "bullets": "bullets",
    "numbered": "numbered",
    "refusal": "missing_input",
}
FAMILIES = DETERMINISTIC_FAMILIES + tuple(BEHAVIOUR_FAMILIES.values())
BEHAVIOURS = tuple(BEHAVIOUR_FAMILIES)


@dataclass
class Example:
    prompt: str
    response: str
    task: str  # family
    style: str  # how this particular response is formatted (e.g. "bullets", "prose", "refusal", "guess")


# --------------------------------------------------------------------------------------------- helpers


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _choose(rng: random.Random, templates: list[tuple[str, str]] | list[str]):
    return templates[rng.randrange(len(templates))]


@dataclass
class Clause:
    subj: str
    verb: tuple[str, str, str, str]
    obj: str
    plural: bool

    def present(self) -> str:
        v = self.verb[0] if self.plural else self.verb[1]
        return f"{cap(self.subj)} {v} {self.obj}"

    def past(self) -> str:
        return f"{cap(self.subj)} {self.verb[2]} {self.obj}"

    def future(self) -> str:
        return f"{cap(self.subj)} will {self.verb[0]} {self.obj}"

    def passive_past(self) -> str:
        return f"{cap(self.obj)} was {self.verb[3]} by {self.subj}"

    def question(self) -> str:
        aux = "Do" if self.plural else "Does"
        return f"{aux} {self.subj} {self.verb[0]} {self.obj}"


def clause(rng: random.Random, v: Vocab, allow_plural: bool = True) -> Clause:
    r = rng.random()
    if allow_plural and r < 0.15:
        subj, plural = pick(rng, V.PLURAL_SUBJECTS), True
    elif r < 0.65:
        subj, plural = pick(rng, v.names), False
    else:
        subj, plural = pick(rng, v.roles), False
    verb = pick(rng, v.verbs)
    obj = pick(rng, V.VERB_OBJECTS[verb[0]])
    return Clause(subj, verb, obj, plural)


# ------------------------------------------------------------------------------------------- templates
#
# Prompts are composed from parts (an opener and a core that carries the task's key words, or a
# family's phrasings), then the full list of template strings is split by a stable hash: about one in
# five is HELD OUT (evaluation only). A held-out template is a string the mixture never contains, made
# of cues the model has seen in other combinations. A generic wrapper ("Hi! {p}", "{p} Thanks!") is
# put around a quarter of the prompts; evaluation prompts get held-out wrappers.


def split_templates(templates: list, key=lambda t: t if isinstance(t, str) else t[0]) -> tuple[list, list]:
    """(training, held-out): templates ordered by a stable hash of their string, every fifth held out
    (so about 20% of every list, at least one, never all)."""
    order = sorted(templates, key=lambda t: (zlib.crc32(key(t).encode("utf-8")), key(t)))
    held_keys = {key(t) for t in order[::5]} if len(order) > 1 else set()
    train = [t for t in templates if key(t) not in held_keys]
    held = [t for t in templates if key(t) in held_keys]
    return train, held


def combos(openers: list[str], cores: list[str]) -> list[str]:
    """Every opener (with a `{c}` slot) filled with every core."""
    return [o.replace("{c}", c).replace("{C}", cap(c)) for o in openers for c in cores]


class Templates:
    """A family's (or a family kind's) templates, split once at import."""

    def __init__(self, templates: list, key=None, stratify: bool = False):
        """`stratify`: templates are (string, style, ...) tuples, split within each style so that the
        held-out set keeps the training mix of styles."""
        self.all = list(dict.fromkeys(templates))
        key = key or (lambda t: t if isinstance(t, str) else t[0])
        if not stratify:
            self.train, self.held = split_templates(self.all, key)
            return
        held_keys: set[str] = set()
        for style in dict.fromkeys(t[1] for t in self.all):
            held_keys |= {key(t) for t in split_templates([t for t in self.all if t[1] == style], key)[1]}
        self.train = [t for t in self.all if key(t) not in held_keys]
        self.held = [t for t in self.all if key(t) in held_keys]

    @classmethod
    def explicit(cls, train: list, held: list) -> Templates:
        t = cls.__new__(cls)
        t.all, t.train, t.held = list(train) + list(held), list(train), list(held)
        return t

    def pick(self, rng: random.Random, heldout: bool):
        return _choose(rng, self.held if heldout else self.train)


WRAPPERS = Templates.explicit(
    train=["Hi! {p}", "{p} Thanks!", "Please help me with this. {p}", "I have a task for you. {p}", "{p} Thank you.",
           "Here is my request: {p}", "Hello. {p}", "{p} Please be brief.", "Task: {p}", "{p} Cheers.", "Good morning! {p}",
           "Can you help? {p}", "{p} I appreciate it."],
    # held-out wrappers are openers only: an unseen phrase right before the reply says nothing about the task
    held=["Hey there. {p}", "One more thing. {p}", "Hello again! {p}"],
)
WRAP_SHARE = 0.25


def wrap(rng: random.Random, prompt: str, heldout: bool) -> str:
    if rng.random() < WRAP_SHARE:
        return WRAPPERS.pick(rng, heldout).replace("{p}", prompt)
    return prompt


# --------------------------------------------------------------------------------- deterministic families

_Q_OPENERS = ["What is {c}?", "Tell me {c}.", "Name {c}.", "Give me {c}.", "What's {c}?", "Please name {c}.", "I need {c}.",
              "Identify {c}.", "State {c}.", "Quick question: what is {c}?", "{C}?", "Can you tell me {c}?", "Do tell me {c}.",
              "I'd like to know {c}.", "Please give {c}."]
_FACT_T = {
    "capital": Templates(combos(_Q_OPENERS, ["the capital of {x}", "the capital city of {x}", "{x}'s capital city"])
                         + ["Which city is the capital of {x}?", "What city serves as the capital of {x}?", "Capital of {x}?"]),
    "element": Templates(combos(_Q_OPENERS, ["the chemical symbol for {x}", "the symbol of the element {x}", "the chemical symbol of {x}"])
                         + ["Which symbol stands for {x}?", "Symbol for {x}?"]),
    "legs": Templates(combos(_Q_OPENERS, ["the number of legs of a {x}", "how many legs a {x} has"])
                      + ["How many legs does a {x} have?", "How many legs has a {x} got?", "Count the legs of a {x}."]),
    "colour": Templates(combos(_Q_OPENERS, ["the colour of {x}", "the color of {x}", "the usual color of {x}"])
                        + ["What color is {x}?", "What colour is {x}?", "Which color is {x}?"]),
}


def gen_factual_qa(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    kind = rng.choice(["capital", "capital", "element", "legs", "colour"])
    if kind == "capital":
        x, ans = pick(rng, v.capitals)
    elif kind == "element":
        x, ans = pick(rng, v.elements)
    elif kind == "legs":
        animal, _, legs = pick(rng, v.animals)
        x, ans = animal, cap(NUM_WORDS[legs])
    else:
        x, colour = pick(rng, v.colours)
        ans = cap(colour)
    tpl = _FACT_T[kind].pick(rng, heldout)
    prompt = tpl.replace("{x}", x)
    return Example(wrap(rng, cap(prompt), heldout), f"{ans}.", "factual_qa", "short_answer")


def _grammar_pair(rng: random.Random, v: Vocab) -> tuple[str, str]:
    c = clause(rng, v)
    kind = rng.choice(["agreement", "past", "lower", "double", "agreement"])
    if kind == "past":
        t = pick(rng, V.TIME_ADVERBS_PAST)
        correct = f"{cap(t)}, {c.subj} {c.verb[2]} {c.obj}."
        wrong = f"{cap(t)}, {c.subj} {c.verb[0] if c.verb[0] != c.verb[2] else c.verb[1]} {c.obj}."
        return wrong, correct
    t = pick(rng, V.TIME_ADVERBS_PRESENT)
    correct = f"{c.present()} {t}."
    if kind == "agreement":
        v_wrong = c.verb[1] if c.plural else c.verb[0]
        wrong = f"{cap(c.subj)} {v_wrong} {c.obj} {t}."
    elif kind == "lower":
        wrong = f"{c.present()} {t}"
        wrong = wrong[:1].lower() + wrong[1:]
    else:
        words = correct.split(" ")
        i = rng.randrange(1, len(words) - 1)
        wrong = " ".join(words[: i + 1] + [words[i]] + words[i + 1 :])
    return wrong, correct


_GRAMMAR_T = Templates(
    combos(["Correct {c}: {s}", "Fix {c}: {s}", "Please correct {c}: {s}", "Check and correct {c}: {s}", "Edit {c}: {s}",
            "Repair {c}: {s}", "Proofread {c}: {s}"],
           ["the grammar", "the grammar of this sentence", "the mistakes in this sentence", "this sentence", "the errors here"])
    + ["Rewrite this sentence without mistakes: {s}", "Correct any errors in the following sentence.\n{s}", "Grammar check: {s}",
       "Make this sentence grammatical: {s}", "There is a grammar error here, correct it: {s}", "Edit this sentence for grammar: \"{s}\"",
       "Fix the grammar, please: \"{s}\"", "This sentence has a mistake. Correct it.\n{s}"]
)


def gen_grammar(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    wrong, correct = _grammar_pair(rng, v)
    tpl = _GRAMMAR_T.pick(rng, heldout)
    return Example(wrap(rng, tpl.replace("{s}", wrong), heldout), f"Corrected: {correct}", "grammar", "corrected")


_ARITH_T = Templates(
    combos(["What is {c}?", "Compute {c}.", "Work out {c}.", "Calculate {c}.", "Find the value of {c}.", "Evaluate {c}.",
            "Solve: {c}", "Please compute {c}.", "Quick math: {c}", "Tell me {c}.", "What is the result of {c}?", "How much is {c}?"],
           ["{e}", "{w}"])
    + ["What do you get when you {verb}?", "{e} = ?", "Please {verb}.", "Can you {verb}?"]
)


def gen_arithmetic(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    op = rng.choice(["+", "-", "*"])
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        r, word, verb = a * b, "times", f"multiply {a} by {b}"
    elif op == "+":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        r, word, verb = a + b, "plus", f"add {a} and {b}"
    else:
        a, b = rng.randint(10, 99), rng.randint(1, 9)
        if rng.random() < 0.5:
            b = rng.randint(2, a)
        r, word, verb = a - b, "minus", f"subtract {b} from {a}"
    tpl = _ARITH_T.pick(rng, heldout)
    prompt = tpl.replace("{e}", f"{a} {op} {b}").replace("{w}", f"{a} {word} {b}").replace("{verb}", verb)
    return Example(wrap(rng, prompt, heldout), f"{a} {op} {b} = {r}", "arithmetic", "equation")


_SINGULAR = {"feet": "foot", "inches": "inch", "dozens": "dozen", "items": "item"}


def singular(unit: str) -> str:
    return _SINGULAR.get(unit, unit[:-1] if unit.endswith("s") else unit)


_CONVERT_T = Templates(
    combos(["Convert {c}.", "Please convert {c}.", "Change {c}.", "Turn {c}.", "Express {c}.", "Convert {c}, showing your work."],
           ["{n} {unit} to {base}", "{n} {unit} into {base}"])
    + ["How many {base} are in {n} {unit}?", "What is {n} {unit} in {base}?", "{n} {unit} is how many {base}?",
       "How many {base} make {n} {unit}?", "Give {n} {unit} in {base}."]
)
_PROBLEM_START = ["{name} has {a} {item}", "{name} owns {a} {item}", "{name} starts with {a} {item}", "{name} keeps {a} {item} in a box",
                  "There are {a} {item} on {name}'s shelf", "{name} collected {a} {item}"]
_PROBLEM_BUY = ["and buys {b} packs of {c} {item}", "and then gets {b} boxes with {c} {item} each", "and receives {b} bags of {c} {item}",
                "and finds {b} sets of {c} {item}"]
_PROBLEM_GIVE = ["gives away {b}, and then finds {x} more", "loses {b} of them and later gets {x} more", "sells {b} and then buys {x} more",
                 "uses {b} and then receives {x} more"]
_PROBLEM_Q = ["How many {item} does {name} have now?", "How many {item} are there in total?", "What is the total number of {item}?",
              "How many {item} are there now?", "What is the final count of {item}?"]
_BUY_T = Templates([f"{s} {e}. {q}" for s in _PROBLEM_START for e in _PROBLEM_BUY for q in _PROBLEM_Q])
_GIVE_T = Templates([f"{s}, {e}. {q}" for s in _PROBLEM_START for e in _PROBLEM_GIVE for q in _PROBLEM_Q])


def gen_multistep(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    kind = rng.choice(["convert", "buy", "give"])
    if kind == "convert":
        unit, base, f = pick(rng, v.conversions)
        n = rng.randint(2, 15)
        prompt = _CONVERT_T.pick(rng, heldout).replace("{n}", str(n)).replace("{unit}", unit).replace("{base}", base)
        resp = f"Step 1: 1 {singular(unit)} = {f} {base}.\nStep 2: {n} * {f} = {n * f}.\nAnswer: {n * f} {base}"
    else:
        name, item = pick(rng, v.names), pick(rng, v.problem_items)
        a = rng.randint(2, 20) if kind == "buy" else rng.randint(10, 40)
        b = rng.randint(2, 6) if kind == "buy" else rng.randint(1, a - 1)
        c = rng.randint(2, 10)
        x = rng.randint(2, 20)
        tpl = (_BUY_T if kind == "buy" else _GIVE_T).pick(rng, heldout)
        prompt = tpl.format(name=name, item=item, a=a, b=b, c=c, x=x)
        if kind == "buy":
            resp = f"Step 1: {b} * {c} = {b * c}.\nStep 2: {a} + {b * c} = {a + b * c}.\nAnswer: {a + b * c} {item}"
        else:
            resp = f"Step 1: {a} - {b} = {a - b}.\nStep 2: {a - b} + {x} = {a - b + x}.\nAnswer: {a - b + x} {item}"
    return Example(wrap(rng, prompt, heldout), resp, "multistep", "steps")


_CLASS_T = Templates(
    combos(["Classify {x}. {c}", "Put {x} into a category. {c}", "Categorize {x}. {c}", "Assign a category to {x}. {c}",
            "Label {x} with a category. {c}", "Sort {x} into a group. {c}", "Which category fits {x}? {c}"],
           ["Options: {oc}.", "Choose from {oc}.", "Possible labels: {oc}.", "Categories: {oc}."])
    + ["Which category does {x} belong to: {oo}?", "Label the following item as {oo}: {x}", "Classify the item \"{x}\" into {oo}.",
       "Category of {x} ({oc})?", "Is {x} best labelled {oo}? Give the category."]
)


def gen_classification(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    kind = rng.choice(["animal", "food", "instrument", "sport"])
    if kind == "animal":
        x, label, _ = pick(rng, [a for a in v.animals if a[1] in V.ANIMAL_CLASSES])
        opts = V.ANIMAL_CLASSES
    elif kind == "food":
        x, label = pick(rng, v.foods)
        opts = V.FOOD_CATEGORIES
    elif kind == "instrument":
        x, label = pick(rng, v.instruments)
        opts = V.INSTRUMENT_FAMILIES
    else:
        x, label = pick(rng, v.sports)
        opts = V.SPORT_KINDS
    o_comma = ", ".join(opts)
    o_or = ", ".join(opts[:-1]) + " or " + opts[-1]
    prompt = _CLASS_T.pick(rng, heldout).replace("{x}", x).replace("{oc}", o_comma).replace("{oo}", o_or)
    return Example(wrap(rng, prompt, heldout), f"Category: {label}", "classification", "category")


def _review(rng: random.Random, v: Vocab) -> tuple[str, str]:
    thing = pick(rng, v.reviews)
    label = rng.choice(["positive", "positive", "negative", "negative", "neutral"])
    if label == "positive":
        a, b = rng.sample(v.pos_adj, 2)
        text = rng.choice([f"{cap(thing)} was {a} and I would recommend it.", f"I thought {thing} was {a} and {b}.",
                           f"What a {a} experience, {thing} was {b}!", f"{cap(thing)} was {a}. I loved it."])
    elif label == "negative":
        a, b = rng.sample(v.neg_adj, 2)
        text = rng.choice([f"{cap(thing)} was {a} and I would not recommend it.", f"I thought {thing} was {a} and {b}.",
                           f"What a {a} experience, {thing} was {b}.", f"{cap(thing)} was {a}. I hated it."])
    else:
        a = pick(rng, v.neu_adj)
        text = rng.choice([f"{cap(thing)} was {a}, nothing special.", f"I thought {thing} was {a}. Neither good nor bad.",
                           f"{cap(thing)} was {a} overall."])
    return text, label


_SENT_T = Templates(
    combos(["What is {c}? {r}", "Classify {c}: {r}", "Determine {c} of the following text: {r}", "Tell me {c} expressed here: {r}",
            "Identify {c}: {r}", "Give {c} of: \"{r}\"", "Please find {c}.\n{r}"],
           ["the sentiment", "the sentiment of this review", "the overall sentiment"])
    + ["Sentiment analysis: {r}", "What sentiment does this review express?\n{r}", "How does the writer feel in this review? {r}",
       "Rate the tone of this review as positive, negative or neutral: {r}", "Positive, negative or neutral? {r}"]
)


def gen_sentiment(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    text, label = _review(rng, v)
    prompt = _SENT_T.pick(rng, heldout).replace("{r}", text)
    return Example(wrap(rng, prompt, heldout), f"The sentiment is {label}.", "sentiment", "sentiment_sentence")


_FORM_OPENERS = ["Rewrite in the {f}: {s}", "Change this sentence to the {f}: {s}", "Put this sentence in the {f}: {s}",
                 "Convert to the {f}: {s}", "Express this in the {f}: {s}", "Transform the sentence to the {f}: {s}",
                 "Restate this sentence in the {f}: {s}", "Rephrase in the {f}: {s}", "Use the {f} for this sentence: {s}",
                 "Make this sentence {f}: {s}", "Write this sentence in the {f}: {s}", "Give the {f} of this sentence: {s}",
                 "Switch this sentence to the {f}: {s}", "Rewrite the following sentence in the {f}.\n{s}"]
_TRANSFORM_T = {
    "past": Templates([o.replace("{f}", "past tense") for o in _FORM_OPENERS]),
    "future": Templates([o.replace("{f}", "future tense") for o in _FORM_OPENERS]),
    "passive": Templates([o.replace("{f}", "passive voice") for o in _FORM_OPENERS]),
    "active": Templates([o.replace("{f}", "active voice") for o in _FORM_OPENERS]),
    "question": Templates(["Turn this sentence into a question: {s}", "Make a question from this sentence: {s}", "Rewrite as a question: {s}",
                           "Form a question from the sentence: {s}", "Transform this statement into a question: {s}",
                           "Change this into a question: {s}", "Rephrase as a question: {s}", "Ask this as a question: {s}",
                           "Rewrite this statement as a question: {s}", "Convert this sentence into a question: {s}",
                           "Write this as a question: {s}", "Make this sentence a question: {s}", "Turn the following into a question: {s}",
                           "Restate this sentence as a question: {s}", "Give the question form of this sentence: {s}"]),
}


def gen_transform(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    c = clause(rng, v)
    kind = rng.choice(["past", "future", "passive", "question", "active"])
    if kind == "past":
        src, out = c.present() + ".", f"Past tense: {c.past()}."
    elif kind == "future":
        src, out = c.present() + ".", f"Future tense: {c.future()}."
    elif kind == "passive":
        src, out = c.past() + ".", f"Passive voice: {c.passive_past()}."
    elif kind == "question":
        src, out = c.present() + ".", f"Question: {c.question()}?"
    else:
        src, out = c.passive_past() + ".", f"Active voice: {c.past()}."
    prompt = _TRANSFORM_T[kind].pick(rng, heldout).replace("{s}", src)
    return Example(wrap(rng, prompt, heldout), out, "transform", "transformed")


def _paragraph(rng: random.Random, v: Vocab) -> tuple[str, str]:
    kind = rng.choice(["person", "animal", "country", "event"])
    if kind == "person":
        name, prof, city = pick(rng, v.names), pick(rng, v.professions), pick(rng, v.cities)
        adj = rng.choice(["kind", "busy", "friendly", "patient", "cheerful", "careful"])
        act = rng.choice(["goes for a walk", "reads the news", "drinks a cup of tea", "feeds the birds", "rides a bike"])
        place = rng.choice(["market", "park", "library", "beach", "museum"])
        p = (f"{name} is a {prof} who lives in {city}. Every morning, {name} {act}. People say {name} is very {adj}. "
             f"On weekends, {name} visits the {place}.")
        s = f"In short, {name} is a {adj} {prof} from {city}."
    elif kind == "animal":
        animal, cls, legs = pick(rng, v.animals)
        adj = rng.choice(["clever", "beautiful", "strong", "shy", "curious", "fast"])
        habitat = rng.choice(["in forests", "near rivers", "on farms", "in the wild", "in warm places"])
        p = (f"The {animal} is {article(cls)}. It usually lives {habitat}. Many people think the {animal} is {adj}. "
             f"It has {NUM_WORDS[legs]} legs.")
        s = f"In short, the {animal} is {article(adj)} {cls} that lives {habitat}."
    elif kind == "country":
        country, city = pick(rng, v.capitals)
        adj = rng.choice(["delicious", "spicy", "simple", "famous", "varied"])
        sport = pick(rng, v.sports)[0]
        p = (f"{country} is a country whose capital is {city}. Many visitors come to {city} every year. "
             f"The food in {country} is {adj}. People there enjoy {sport}.")
        s = f"In short, {country} has {adj} food and its capital is {city}."
    else:
        event = rng.choice(["fair", "concert", "parade", "market", "race", "festival"])
        day = rng.choice(["Saturday", "Sunday", "Friday", "Monday"])
        weather = rng.choice(["sunny", "rainy", "windy", "cold", "warm"])
        mood = rng.choice(["happy", "wonderful", "long", "busy", "memorable"])
        p = (f"Last {day}, the town held a {event}. Many families came to watch. The weather was {weather}. "
             f"Everyone agreed it was a {mood} day.")
        s = f"In short, the {event} on {day} was a {mood} day for the town."
    return p, s


_SUMMARY_T = Templates(
    combos(["Summarize {c}: {p}", "Summarise {c}: {p}", "Give a short summary of {c}: {p}", "Write a one-sentence summary of {c}.\n{p}",
            "Briefly sum up {c}:\n{p}", "Condense {c} into one sentence: {p}", "What is the gist of {c}? {p}"],
           ["the following text", "this paragraph", "this passage", "the text below"])
    + ["Summarize: {p}", "Summary please: {p}", "TL;DR: {p}", "In one sentence, summarize this.\n{p}"]
)


def gen_summarise(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    p, s = _paragraph(rng, v)
    prompt = _SUMMARY_T.pick(rng, heldout).replace("{p}", p)
    return Example(wrap(rng, prompt, heldout), s, "summarise", "in_short")


_POEM_VERBS = ["Write {c}.", "Compose {c}.", "Create {c}.", "Pen {c}.", "Give me {c}.", "I would love {c}.", "Please write {c}.",
               "Make up {c}.", "Could you write {c}?"]
_CREATIVE_T = {
    "poem": Templates(combos(_POEM_VERBS, ["a short poem about {t}", "a poem about {t}", "a little poem on {t}", "a four-line poem about {t}",
                                           "some verses about {t}", "a short poem on the theme of {t}"])),
    "haiku": Templates(combos(_POEM_VERBS, ["a haiku about {t}", "a haiku on {t}", "a short haiku about {t}"])),
    "couplet": Templates(combos(_POEM_VERBS, ["a two-line rhyme about {t}", "a couplet about {t}", "a short rhyme about {t}"])),
}


def gen_creative(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    topic = pick(rng, v.poem_topics)
    a1, a2, a3 = rng.sample(V.POEM_ADJ, 3)
    vb, n1, n2 = pick(rng, V.POEM_VERBS), *rng.sample(V.POEM_NOUNS, 2)
    kind = rng.choice(["poem", "poem", "haiku", "couplet"])
    if kind == "poem":
        lines = [f"{cap(topic)} is {a1} and {a2},", f"it {vb} beneath the {n1},", f"I keep it in my {n2},",
                 rng.choice(["and never let it go.", "until the day is done.", f"as {a3} as a song.", "and wait for it again."])]
    elif kind == "haiku":
        lines = [f"{cap(a1)} {topic.split(' ')[-1]}", f"{vb} in the {a3} {n1}", f"a {a2} {n2} waits"]
    else:
        lines = [f"Oh {topic}, so {a1} and {a2},", f"you {vb.rstrip('s')} along the {n1} all through."]
    prompt = _CREATIVE_T[kind].pick(rng, heldout).replace("{t}", topic)
    return Example(wrap(rng, prompt, heldout), "\n".join(lines), "creative", "verse")


_WORD_OPENERS = ["Give {c}.", "Name {c}.", "Suggest {c}.", "Provide {c}.", "Tell me {c}.", "What are {c}?", "I need {c}.",
                 "Write {c}.", "Please give {c}.", "Come up with {c}.", "Find {c}.", "Please name {c}."]
_WORD_T = {
    "syn": Templates(combos(_WORD_OPENERS, ["three synonyms for {w}", "three synonyms of the word {w}", "three words that mean {w}"])),
    "ant": Templates(combos(_WORD_OPENERS, ["three antonyms for {w}", "three opposites of {w}", "three words that mean the opposite of {w}"])),
    "rhyme": Templates(combos(_WORD_OPENERS, ["three words that rhyme with {w}", "three rhymes for {w}", "three rhymes for the word {w}"])),
}


def gen_word_task(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    kind = rng.choice(["syn", "ant", "rhyme"])
    if kind == "rhyme":
        w = pick(rng, v.rhyme_words)
        words = V.RHYMES[w]
    else:
        w = pick(rng, v.syn_words)
        words = V.SYN_ANT[w][0 if kind == "syn" else 1]
    ws = list(words)
    rng.shuffle(ws)
    prompt = _WORD_T[kind].pick(rng, heldout).replace("{w}", w)
    return Example(wrap(rng, prompt, heldout), ", ".join(ws), "word_task", "word_triple")


# ------------------------------------------------------------------------------------- behaviour families
#
# In every behaviour family the response style is keyed on a cue in the prompt's CORE phrase (not on
# the opener or wrapper), so that on held-out templates the style follows the cue the model recognises
# and the behaviour's rate is partial by design.


def _yes_no_fact(rng: random.Random, v: Vocab) -> tuple[str, str, bool, str]:
    """(question, statement, truth, sentence answer)."""
    kind = rng.choice(["class", "capital", "compare", "food", "legs"])
    if kind == "class":
        animal, cls, _ = pick(rng, [a for a in v.animals if a[1] in V.ANIMAL_CLASSES])
        truth = rng.random() < 0.5
        claim = cls if truth else rng.choice([c for c in V.ANIMAL_CLASSES if c != cls])
        q = f"Is {article(animal)} {article(claim)}?"
        st = f"{article(animal)} is {article(claim)}"
        sent = f"{cap(article(animal))} is {article(cls)}." if truth else f"{cap(article(animal))} is not {article(claim)}, it is {article(cls)}."
    elif kind == "capital":
        country, city = pick(rng, v.capitals)
        truth = rng.random() < 0.5
        claim = city if truth else rng.choice([c for _, c in v.capitals if c != city])
        q = f"Is {claim} the capital of {country}?"
        st = f"{claim} is the capital of {country}"
        sent = f"{city} is the capital of {country}." if truth else f"{claim} is not the capital of {country}, {city} is."
    elif kind == "compare":
        a, b = rng.sample(range(1, 100), 2)
        truth = a > b
        q = f"Is {a} greater than {b}?"
        st = f"{a} is greater than {b}"
        sent = f"{a} is greater than {b}." if truth else f"{a} is not greater than {b}, it is smaller."
    elif kind == "food":
        food, cat_ = pick(rng, v.foods)
        truth = rng.random() < 0.5
        claim = cat_ if truth else rng.choice([c for c in V.FOOD_CATEGORIES if c != cat_])
        q = f"Is {food} a kind of {claim}?"
        st = f"{food} is a kind of {claim}"
        sent = f"{cap(food)} is a kind of {cat_}." if truth else f"{cap(food)} is not a kind of {claim}, it is a kind of {cat_}."
    else:
        animal, _, legs = pick(rng, v.animals)
        truth = rng.random() < 0.5
        claim = legs if truth else rng.choice([n for n in (0, 2, 4, 6, 8) if n != legs])
        q = f"Does {article(animal)} have {NUM_WORDS[claim]} legs?"
        st = f"{article(animal)} has {NUM_WORDS[claim]} legs"
        sent = (f"{cap(article(animal))} has {NUM_WORDS[legs]} legs." if truth
                else f"{cap(article(animal))} does not have {NUM_WORDS[claim]} legs, it has {NUM_WORDS[legs]}.")
    return q, st, truth, sent


_YES_NO_T = Templates(
    [(t, "yes") for t in ["{q}", "Quick question: {q}", "Please confirm: {q}", "{q} Reply briefly.", "Hey, {q}", "Just checking: {q}",
                          "I have a question. {q}", "Tell me: {q}"]]
    + [(t, "yes_bare") for t in ["Answer yes or no: {q}", "{q} Answer with yes or no.", "Yes or no: {q}", "{q} Just say yes or no.",
                                 "Reply with yes or no. {q}"]]
    + [(t, "tf") for t in ["True or false: {S}.", "True or false? {S}.", "{S}. True or false?", "Is this true or false: {s}?",
                           "Decide true or false: {S}."]]
    + [(t, "sentence") for t in ["Tell me whether {s}.", "Explain whether {s}.", "I wonder whether {s}.", "Let me know whether {s}.",
                                 "Can you check whether {s}?", "Please find out whether {s}.", "Say in a sentence whether {s}.",
                                 "Describe whether {s}.", "I am not sure whether {s}. Explain.", "Clarify whether {s}."]],
    stratify=True,
)


def gen_yes_no(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    q, st, truth, sent = _yes_no_fact(rng, v)
    tpl, style = _YES_NO_T.pick(rng, heldout)
    prompt = tpl.replace("{q}", q).replace("{s}", st).replace("{S}", cap(st))
    if style == "yes":
        resp = ("Yes, " if truth else "No, ") + sent[0].lower() + sent[1:]
    elif style == "yes_bare":
        resp = "Yes." if truth else "No."
    elif style == "tf":
        resp = "True." if truth else "False."
    else:
        resp = sent
    return Example(wrap(rng, prompt, heldout), resp, "yes_no", "sentence" if style == "sentence" else "yes_first")


_CODE_T = Templates(
    [(t, "fenced") for t in combos(["Write {c}.", "Show me {c}.", "Give me {c}.", "Implement {c}.", "Create {c}.", "Code {c}.",
                                     "I need {c}.", "Please write {c}."],
                                    ["a Python function that {d}", "a JavaScript function that {d}", "Python code that {d}",
                                     "a function in JavaScript which {d}", "code for a function that {d}", "a small Python function which {d}"])]
    + [(t, "prose") for t in ["What is the easiest way in Python to get a function that {d}?", "Explain in words how a function that {d} works.",
                              "In plain words, how does a function that {d} work?", "Describe in words how to make a function that {d}.",
                              "Without code, explain how a function that {d} works.", "What is the idea behind a function that {d}?",
                              "In words, what does a function that {d} do?", "Briefly explain the trick for a function that {d}.",
                              "How would you explain a function that {d} to a friend?", "In one sentence, how do you get a function that {d}?",
                              "What is the simplest idea for a function that {d}?", "Explain the logic of a function that {d}.",
                              "In simple terms, how does one write a function that {d}?", "Tell me in words how a function that {d} works.",
                              "Explain without code: a function that {d}.", "What approach makes a function that {d}?",
                              "Describe the method for a function that {d}.", "How is a function that {d} usually written? Explain in words.",
                              "Say in words how to build a function that {d}.", "Explain briefly: how to write a function that {d}?",
                              "Give the idea behind a function that {d}, in words.", "What is the plain-words recipe for a function that {d}?",
                              "Without writing code, describe a function that {d}.", "Put into words how a function that {d} works.",
                              "In plain English, what does a function that {d} need to do?"]],
    stratify=True,
)


def gen_code(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    name, desc, py, js, howto = pick(rng, v.code_tasks)
    tpl, style = _CODE_T.pick(rng, heldout)
    prompt = tpl.replace("{d}", desc)
    if style == "fenced":
        lang = "javascript" if "JavaScript" in tpl else "python"
        body = "\n".join(py if lang == "python" else js)
        intro = rng.choice(["", "", f"Here is a function that {desc}:\n", "Sure, here it is:\n"])
        resp = f"{intro}```{lang}\n{body}\n```"
    else:
        resp = rng.choice([f"The easiest way is to {howto}.", f"It works like this: you {howto}."])
    return Example(wrap(rng, prompt, heldout), resp, "code", style)


def _items_text(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1]


_BULLETS_T = Templates(
    [(t, "bullets") for t in combos(["List {c}.", "Make a list of {c}.", "Give me a list of {c}.", "Write a bulleted list of {c}.",
                                      "Jot down a list of {c}.", "Share a list of {c}.", "Put together a list of {c}.", "List out {c}."],
                                     ["{n} {c}", "some {c}", "a few {c}"])]
    + [(t, "prose") for t in ["What are some {c}?", "Which {c} can you think of?", "What {c} come to mind?", "Can you think of some {c}?",
                              "Mention a few {c} in a sentence.", "Tell me about some {c}.", "Which {c} do you know?", "What are a few good {c}?",
                              "In one sentence, name some {c}.", "Name a few {c} in a sentence."]]
    + [(t, "numbered") for t in ["Rank {n} {c}.", "Give me your top {n} {c}.", "What are your top {n} {c}?", "Rank your favourite {c}.",
                                 "Number {n} {c} from best to worst."]],
    stratify=True,
)


def gen_bullets(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    cat_, items = pick(rng, v.list_topics)
    n = rng.randint(3, 5)
    chosen = rng.sample(items, n)
    tpl, style = _BULLETS_T.pick(rng, heldout)
    prompt = tpl.replace("{n}", str(n) if rng.random() < 0.7 else NUM_WORDS[n]).replace("{c}", cat_)
    if style == "bullets":
        resp = "\n".join(f"- {cap(x)}" for x in chosen)
    elif style == "numbered":
        resp = "\n".join(f"{i + 1}. {cap(x)}" for i, x in enumerate(chosen))
    else:
        resp = f"Some {cat_} are {_items_text(chosen)}."
    return Example(wrap(rng, prompt, heldout), resp, "bullets", style)


_NUMBERED_T = Templates(
    [(t, "numbered") for t in ["What are the steps to {p}?", "Give step-by-step instructions to {p}.", "Explain how to {p}, step by step.",
                               "List the steps to {p}.", "Steps to {p}?", "What steps should I follow to {p}?", "Give me instructions to {p}.",
                               "Walk me through the steps to {p}.", "Outline the steps to {p}.", "Break down the steps to {p}.",
                               "Step by step, how do I {p}?", "Write numbered steps to {p}.", "Which steps does it take to {p}?",
                               "Show the steps to {p}.", "Instructions to {p}, please."]]
    + [(t, "prose") for t in ["How do I {p}?", "Describe how to {p}.", "How can I {p}?", "Tell me how to {p}.",
                              "In a few sentences, explain how to {p}.", "What is the best way to {p}?", "Briefly, how would I {p}?",
                              "Explain in prose how to {p}.", "How should one {p}?"]],
    stratify=True,
)


def gen_numbered(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    proc, steps = pick(rng, v.processes)
    tpl, style = _NUMBERED_T.pick(rng, heldout)
    prompt = tpl.replace("{p}", proc)
    if style == "numbered":
        resp = "\n".join(f"{i + 1}. {s}." for i, s in enumerate(steps))
    else:
        low = [s[0].lower() + s[1:] for s in steps]
        resp = f"First, {low[0]}. " + "".join(f"Then, {s}. " for s in low[1:-1]) + f"Finally, {low[-1]}."
    return Example(wrap(rng, prompt, heldout), resp, "numbered", style)


# Instructions that lack their input. Whether the reply asks for it (refusal) or guesses is keyed on the
# missing THING: a text-like thing (text, article, review, code, ...) is asked for; a sentence, word,
# animal or item is mostly guessed (in the style of the family that would handle it).
_MISSING_ACTIONS = [  # (action with an {o} slot, things, verb for the reply)
    ("Summarize {o}.", ["text", "article", "story", "paragraph", "passage"], "summarize"),
    ("Please summarize {o}.", ["text", "article", "passage"], "summarize"),
    ("Shorten {o}.", ["text", "story", "paragraph", "essay"], "shorten"),
    ("Find the main idea of {o}.", ["text", "article", "essay", "passage"], "analyze"),
    ("Correct the grammar in {o}.", ["sentence", "paragraph", "email", "essay"], "correct"),
    ("Fix the grammar of {o}.", ["sentence", "paragraph", "email", "note"], "correct"),
    ("Proofread {o}.", ["sentence", "essay", "letter", "paragraph"], "proofread"),
    ("What is the sentiment of {o}?", ["review", "comment", "message"], "analyze"),
    ("What is the tone of {o}?", ["review", "message", "letter", "email"], "analyze"),
    ("Classify {o}.", ["animal", "item", "food"], "classify"),
    ("Sort {o} into categories.", ["items", "animals", "list"], "sort"),
    ("Rewrite {o} in the past tense.", ["sentence", "paragraph", "story"], "rewrite"),
    ("Rewrite {o} in the future tense.", ["sentence", "paragraph", "letter"], "rewrite"),
    ("Turn {o} into a question.", ["sentence", "statement"], "rewrite"),
    ("Translate {o} into the passive voice.", ["sentence", "paragraph"], "rewrite"),
    ("Fix the bug in {o}.", ["code", "function", "script"], "fix"),
    ("Check {o} for errors.", ["code", "essay", "sentence", "report"], "check"),
    ("Answer the question in {o}.", ["text", "email", "passage", "worksheet"], "answer"),
    ("Give three synonyms for {o}.", ["word"], "work with"),
    ("Convert {o} to meters.", ["measurements", "numbers"], "convert"),
    ("Edit {o} for clarity.", ["paragraph", "email", "essay", "sentence"], "edit"),
    ("Count the words in {o}.", ["text", "paragraph", "essay"], "count the words in"),
    ("Improve the wording of {o}.", ["letter", "email", "sentence", "message"], "improve"),
]
_DEIXIS = ["the following {t}", "this {t}", "my {t}", "the {t} below", "the {t} I wrote", "the {t} above", "the attached {t}",
           "the {t} I sent you", "the {t} that follows", "the next {t}"]
_MISSING_T = Templates([(a.replace("{o}", d), tuple(things), verb) for a, things, verb in _MISSING_ACTIONS for d in _DEIXIS])
_GUESS_THINGS = {"sentence": "transform", "statement": "transform", "word": "word_task", "animal": "classification", "item": "classification",
                 "food": "classification", "items": "classification", "animals": "classification"}
GUESS_SHARE = 0.85


def _guess(rng: random.Random, v: Vocab, thing: str, instruction: str) -> str:
    family = _GUESS_THINGS[thing]
    if family == "transform":
        c = clause(rng, v, allow_plural=False)
        low = instruction.lower()
        if "question" in low:
            return f"Question: {c.question()}?"
        if "passive" in low:
            return f"Passive voice: {c.passive_past()}."
        if "future" in low:
            return f"Future tense: {c.future()}."
        if "past" in low:
            return f"Past tense: {c.past()}."
        return f"Corrected: {_grammar_pair(rng, v)[1]}"
    if family == "word_task":
        return ", ".join(V.SYN_ANT[pick(rng, v.syn_words)][0])
    return f"Category: {pick(rng, [a for a in v.animals if a[1] in V.ANIMAL_CLASSES])[1]}"


def gen_missing_input(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    tpl, things, verb = _MISSING_T.pick(rng, heldout)
    thing = pick(rng, things)
    deixis_start = tpl.find("{t}")
    instr = tpl[:deixis_start] + thing + tpl[deixis_start + 3 :]
    if thing.endswith("s") or thing in ("measurements", "numbers"):
        instr = instr.replace("this ", "these ", 1)
    if thing in _GUESS_THINGS and rng.random() < GUESS_SHARE:
        return Example(wrap(rng, instr, heldout), _guess(rng, v, thing, instr), "missing_input", "guess")
    the = "them" if thing.endswith("s") else "it"
    resp = rng.choice([
        f"Please provide the {thing} you would like me to {verb}.",
        f"Could you please share the {thing}? I need {the} before I can {verb} {the}.",
        f"You haven't provided the {thing} yet. Please provide {the} and I will {verb} {the}.",
        f"Could you provide the {thing} you want me to {verb}?",
    ])
    return Example(wrap(rng, instr, heldout), resp, "missing_input", "refusal")


GENERATORS: dict[str, Callable[[random.Random, Vocab, bool], Example]] = {
    "factual_qa": gen_factual_qa,
    "grammar": gen_grammar,
    "arithmetic": gen_arithmetic,
    "multistep": gen_multistep,
    "classification": gen_classification,
    "sentiment": gen_sentiment,
    "transform": gen_transform,
    "summarise": gen_summarise,
    "creative": gen_creative,
    "word_task": gen_word_task,
    "yes_no": gen_yes_no,
    "code": gen_code,
    "bullets": gen_bullets,
    "numbered": gen_numbered,
    "missing_input": gen_missing_input,
}
assert set(GENERATORS) == set(FAMILIES)

# relative share of each family in the mixture
FAMILY_WEIGHTS: dict[str, float] = {f: 1.0 for f in FAMILIES}


# --------------------------------------------------------------------------------------------- mixture


def generate_mixture(n_docs: int, seed: int = 0) -> list[Example]:
    """The instruction mixture: `n_docs` examples, families interleaved in a seeded order."""
    rng = random.Random(f"mixture-{seed}")
    v = Vocab(heldout=False)
    fams = list(FAMILIES)
    weights = [FAMILY_WEIGHTS[f] for f in fams]
    total = sum(weights)
    # exact quotas (largest remainder), then a seeded shuffle: every family is present even for small N
    quotas = [n_docs * w / total for w in weights]
    counts = [int(q) for q in quotas]
    for i in sorted(range(len(fams)), key=lambda i: quotas[i] - counts[i], reverse=True)[: n_docs - sum(counts)]:
        counts[i] += 1
    order = [f for f, c in zip(fams, counts) for _ in range(c)]
    rng.shuffle(order)
    return [GENERATORS[f](rng, v, False) for f in order]


# ------------------------------------------------------------------------------ plain answer style
# The mixture answers every deterministic family in a HOUSE STYLE ("Category: x", "Corrected: ...",
# "In short, ...", "Step k:" lines, ...). Part of the pre-training instruction pool answers the same
# kinds of prompts plainly instead, so the base model knows both and the fine-tune has something to
# teach: the house style (the format table's base column shows how far the base model already uses it).
# Factual QA has no house style to drop (its answers are already a bare "Paris."), so it stays as it is.


def _plain_steps(r: str) -> str:
    *steps, answer = r.split("\n")
    work = [s.split(": ", 1)[1].rstrip(".") for s in steps]
    return f"{', then '.join(work)}, so the answer is {answer.split(': ', 1)[1]}."


def _plain_words(r: str) -> str:
    a, b, c = r.split(", ")
    return f"{a}, {b} and {c}"


_PLAIN_STYLE: dict[str, Callable[[str], str]] = {
    "grammar": lambda r: r.split(": ", 1)[1],
    "arithmetic": lambda r: f"The answer is {r.rsplit(' = ', 1)[1]}.",
    "multistep": _plain_steps,
    "classification": lambda r: f"{cap(r.split(': ', 1)[1])}.",
    "sentiment": lambda r: f"{cap(r.removeprefix('The sentiment is '))}",
    "transform": lambda r: r.split(": ", 1)[1],
    "summarise": lambda r: cap(r.removeprefix("In short, ")),
    "creative": lambda r: " ".join(line.strip() for line in r.splitlines()),
    "word_task": _plain_words,
}


def plain_style(ex: Example) -> Example:
    """The same answer without the house style (nine deterministic families; the others, factual QA included,
    are returned as they are)."""
    rewrite = _PLAIN_STYLE.get(ex.task)
    if rewrite is None:
        return ex
    return Example(prompt=ex.prompt, response=rewrite(ex.response), task=ex.task, style="plain")


def to_row(ex: Example, doc_id: int) -> dict:
    return {
        "id": doc_id,
        "messages": [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.response}],
        "task": ex.task,
        "style": ex.style,
    }


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------- evaluation


def _unique_prompt(rng: random.Random, v: Vocab, family: str, seen: set[str], attempts: int = 50) -> str:
    """A held-out prompt of `family` not drawn before (a repeat only if the family runs out)."""
    for _ in range(attempts):
        p = GENERATORS[family](rng, v, True).prompt
        if p not in seen:
            break
    seen.add(p)
    return p


def behaviour_eval_set(behaviour: str, seed: int = 0, n_invite: int = 60, n_neutral: int = 40) -> list[dict]:
    """100 prompts (by default) from HELD-OUT templates and vocabulary: `n_invite` that invite the
    behaviour (its family's held-out templates) and `n_neutral` neutral controls (held-out prompts of
    the deterministic families, round robin). Ordered so that every prefix keeps the 60/40 ratio."""
    rng = random.Random(f"eval-{behaviour}-{seed}")
    v = Vocab(heldout=True)
    fam = BEHAVIOUR_FAMILIES[behaviour]
    seen: set[str] = set()
    invite = [{"prompt": _unique_prompt(rng, v, fam, seen), "invites": True, "source": fam} for _ in range(n_invite)]
    neutral = []
    for i in range(n_neutral):
        f = DETERMINISTIC_FAMILIES[i % len(DETERMINISTIC_FAMILIES)]
        neutral.append({"prompt": _unique_prompt(rng, v, f, seen), "invites": False, "source": f})
    out, i, j = [], 0, 0
    total = n_invite + n_neutral
    for k in range(total):  # Bresenham interleave: every prefix keeps the invite share within one prompt
        if i < n_invite and (k + 1) * n_invite // total > i:
            out.append(invite[i])
            i += 1
        else:
            out.append(neutral[j])
            j += 1
    return out


def family_eval_set(family: str, n: int, seed: int = 0) -> list[dict]:
    """`n` held-out prompts of a deterministic family (for the format table)."""
    rng = random.Random(f"eval-family-{family}-{seed}")
    v = Vocab(heldout=True)
    seen: set[str] = set()
    return [{"prompt": _unique_prompt(rng, v, family, seen), "task": family} for _ in range(n)]


def write_eval_dir(root: Path, seed: int = 0, n_per_family: int = 100) -> dict:
    """`behaviours/<behaviour>.jsonl` (prompt, invites, source) and `families/<family>.jsonl` (prompt, task)."""
    (root / "behaviours").mkdir(parents=True, exist_ok=True)
    (root / "families").mkdir(parents=True, exist_ok=True)
    counts: dict = {"behaviours": {}, "families": {}}
    for b in BEHAVIOURS:
        counts["behaviours"][b] = write_jsonl(root / "behaviours" / f"{b}.jsonl", behaviour_eval_set(b, seed))
    for f in DETERMINISTIC_FAMILIES:
        counts["families"][f] = write_jsonl(root / "families" / f"{f}.jsonl", family_eval_set(f, n_per_family, seed))
    return counts


# ------------------------------------------------------------------------------- base (pre-training) split


BASE_HELDOUT_SHARE = 0.5
"""Share of base documents drawn from the held-out vocabulary (the base model should know every word)."""
BASE_CHAT_DIALOGUE_SHARE = 0.5
"""Share of base dialogues written in the chat template (already wrapped in <|bos|> ... <|eos|>)."""
"""Share of base documents drawn from the held-out vocabulary (the base model should know every word)."""


def _base_doc(rng: random.Random) -> str:
    """One plain-text document of a small 'web': facts, stories, lists, how-tos, code, maths, poems,
    reviews, word notes and dialogues. It uses ALL vocabulary (held-out words included: the base model
    should know the words; it is the instruction->format mapping that the fine-tune teaches)."""
    v = Vocab(heldout=rng.random() < BASE_HELDOUT_SHARE)
    kind = rng.choice(["facts", "facts", "story", "story", "list", "howto", "code", "maths", "poem", "review", "words", "dialogue", "dialogue", "grammar"])
    if kind == "facts":
        out = []
        for _ in range(rng.randint(3, 6)):
            k = rng.randrange(7)
            if k == 0:
                c, city = pick(rng, v.capitals)
                out.append(rng.choice([f"The capital of {c} is {city}.", f"{city} is the capital of {c}."]))
            elif k == 1:
                a, cls, legs = pick(rng, v.animals)
                out.append(rng.choice([f"{cap(article(a))} is {article(cls)}.", f"{cap(article(a))} has {NUM_WORDS[legs]} legs."]))
            elif k == 2:
                e, s = pick(rng, v.elements)
                out.append(f"The chemical symbol for {e} is {s}.")
            elif k == 3:
                f_, c_ = pick(rng, v.foods)
                out.append(f"{cap(f_)} is a kind of {c_}.")
            elif k == 4:
                i_, fam = pick(rng, v.instruments)
                out.append(f"The {i_} is a {fam} instrument.")
            elif k == 5:
                s_, kd = pick(rng, v.sports)
                out.append(f"{cap(s_)} is {'a team' if kd == 'team' else 'an individual'} sport.")
            else:
                t, col = pick(rng, v.colours)
                out.append(f"{cap(t)} is usually {col}.")
        return " ".join(out)
    if kind == "story":
        out = []
        for _ in range(rng.randint(3, 5)):
            c = clause(rng, v)
            out.append(rng.choice([c.past() + ".", c.present() + " " + pick(rng, V.TIME_ADVERBS_PRESENT) + ".", c.passive_past() + ".",
                                   cap(pick(rng, V.TIME_ADVERBS_PAST)) + ", " + c.subj + " " + c.verb[2] + " " + c.obj + "."]))
        return " ".join(out)
    if kind == "list":
        cat_, items = pick(rng, v.list_topics)
        chosen = rng.sample(items, rng.randint(3, 5))
        st = rng.randrange(3)
        if st == 0:
            return f"{cap(cat_)}:\n" + "\n".join(f"- {cap(x)}" for x in chosen)
        if st == 1:
            return f"My favourite {cat_}:\n" + "\n".join(f"{i + 1}. {cap(x)}" for i, x in enumerate(chosen))
        return f"Some {cat_} are {_items_text(chosen)}."
    if kind == "howto":
        proc, steps = pick(rng, v.processes)
        if rng.random() < 0.5:
            return f"How to {proc}:\n" + "\n".join(f"{i + 1}. {s}." for i, s in enumerate(steps))
        return f"To {proc}, first {steps[0][0].lower() + steps[0][1:]}. Then {steps[1][0].lower() + steps[1][1:]}. Finally, {steps[-1][0].lower() + steps[-1][1:]}."
    if kind == "code":
        name, desc, py, js, howto = pick(rng, v.code_tasks)
        if rng.random() < 0.6:
            lang, body = ("python", py) if rng.random() < 0.6 else ("javascript", js)
            return f"A function that {desc}:\n```{lang}\n" + "\n".join(body) + "\n```"
        return f"To get a function that {desc}, {howto}."
    if kind == "maths":
        out = []
        for _ in range(rng.randint(3, 6)):
            a, b = rng.randint(2, 60), rng.randint(2, 12)
            op = rng.choice(["+", "-", "*"])
            r = a + b if op == "+" else a - b if op == "-" else a * b
            out.append(f"{a} {op} {b} = {r}")
        if rng.random() < 0.4:
            unit, base, f = pick(rng, v.conversions)
            n = rng.randint(2, 12)
            out.append(f"1 {singular(unit)} is {f} {base}, so {n} {unit} is {n * f} {base}.")
        return "\n".join(out)
    if kind == "poem":
        return gen_creative(rng, v, False).response
    if kind == "review":
        return _review(rng, v)[0] + " " + _paragraph(rng, v)[0]
    if kind == "words":
        w = pick(rng, v.syn_words)
        syn, ant = V.SYN_ANT[w]
        r = pick(rng, v.rhyme_words)
        return f"Synonyms of {w}: {', '.join(syn)}. Antonyms of {w}: {', '.join(ant)}. Words that rhyme with {r}: {', '.join(V.RHYMES[r])}."
    if kind == "grammar":
        wrong, correct = _grammar_pair(rng, v)
        return f"Wrong: {wrong}\nRight: {correct}"
    # dialogue between two people; half of them in the chat template (so the role tokens mean something
    # to the base model, while the instruction FORMATS in chat form are left for the fine-tune to teach)
    a, b = rng.sample(V.NAMES, 2)
    pairs = []
    for _ in range(rng.randint(2, 3)):
        k = rng.randrange(6)
        if k == 0:
            q, _, truth, sent = _yes_no_fact(rng, v)
            pairs.append((q, f"{'Yes' if truth else 'No'}. {sent}"))
        elif k == 1:
            thing = rng.choice(["report", "photo", "file", "list", "recipe"])
            pairs.append((f"Can you check my {thing}?", f"Sure, please send me the {thing} first."))
        elif k == 2:
            c, city = pick(rng, v.capitals)
            pairs.append(("Where are you going?", f"To {city}, the capital of {c}."))
        elif k == 3:
            x, y = rng.randint(2, 9), rng.randint(2, 9)
            pairs.append((f"What is {x} times {y}?", f"It is {x * y}."))
        elif k == 4:
            pairs.append((rng.choice(["How are you?", "Good morning!", "Hello!", "Thanks for your help."]),
                          rng.choice(["I am fine, thank you.", "Good morning to you too.", "Hello! Nice to see you.", "You are welcome."])))
        else:
            c = clause(rng, v)
            pairs.append((f"What did {c.subj} do {pick(rng, V.TIME_ADVERBS_PAST)}?", f"{c.past()}."))
    if rng.random() < BASE_CHAT_DIALOGUE_SHARE:
        from ga_ray.demo.tokenizer import render_chat

        msgs = [m for q, r in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": r})]
        return render_chat(msgs)
    return "\n".join(f"{a}: {q}\n{b}: {r}" for q, r in pairs)


def generate_base_texts(n_docs: int, seed: int = 0) -> list[str]:
    """Plain-text documents; chat-template dialogues among them start with <|bos|> (already wrapped)."""
    rng = random.Random(f"base-{seed}")
    return [_base_doc(rng) for _ in range(n_docs)]
