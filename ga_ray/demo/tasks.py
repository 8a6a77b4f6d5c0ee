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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
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


# --------------------------------------------------------------------------------- deterministic families


def gen_factual_qa(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    kind = rng.choice(["capital", "capital", "element", "legs", "colour"])
    if kind == "capital":
        country, city = pick(rng, v.capitals)
        train = ["What is the capital of {x}?", "Name the capital of {x}.", "Which city is the capital of {x}?",
                 "Tell me the capital city of {x}.", "What is {x}'s capital city?", "Capital city of {x}?"]
        held = ["What city serves as the capital of {x}?", "Give the capital of {x}.", "I need the name of the capital of {x}.",
                "Which city is {x}'s capital?"]
        x, ans = country, city
    elif kind == "element":
        el, sym = pick(rng, v.elements)
        train = ["What is the chemical symbol for {x}?", "Which symbol stands for {x}?", "Give the chemical symbol of {x}.",
                 "What is the symbol of the element {x}?"]
        held = ["Which chemical symbol does {x} have?", "Name the element symbol for {x}.", "Symbol for {x}?"]
        x, ans = el, sym
    elif kind == "legs":
        animal, _, legs = pick(rng, v.animals)
        train = ["How many legs does a {x} have?", "What is the number of legs of a {x}?", "How many legs has a {x} got?"]
        held = ["Count the legs of a {x}.", "What number of legs does a {x} have?"]
        x, ans = animal, cap(NUM_WORDS[legs])
    else:
        thing, colour = pick(rng, v.colours)
        train = ["What color is {x}?", "What colour is {x}?", "Which color is {x}?", "Name the color of {x}."]
        held = ["What colour is {x} usually?", "Tell me the usual color of {x}."]
        x, ans = thing, cap(colour)
    tpl = _choose(rng, held if heldout else train)
    return Example(tpl.format(x=x), f"{ans}.", "factual_qa", "short_answer")


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


def gen_grammar(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    wrong, correct = _grammar_pair(rng, v)
    train = ["Correct the grammar: {s}", "Fix the grammar in this sentence: {s}", "Please correct this sentence: {s}",
             "Edit this sentence for grammar: \"{s}\"", "Rewrite this sentence without mistakes: {s}",
             "Correct any errors in the following sentence.\n{s}", "Grammar check: {s}"]
    held = ["Proofread this sentence: {s}", "Make this sentence grammatical: {s}", "Repair the grammar of the sentence below.\n{s}",
            "There is a grammar error here, correct it: {s}", "Fix the mistakes in: {s}"]
    tpl = _choose(rng, held if heldout else train)
    return Example(tpl.format(s=wrong), f"Corrected: {correct}", "grammar", "corrected")


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
    train = ["What is {a} {op} {b}?", "Calculate {a} {word} {b}.", "Compute {a} {op} {b}.", "Work out {a} {op} {b}.",
             "What do you get when you {verb}?", "{a} {op} {b} = ?"]
    held = ["Find the value of {a} {op} {b}.", "Evaluate {a} {op} {b}.", "Solve: {a} {op} {b}", "How much is {a} {word} {b}?"]
    tpl = _choose(rng, held if heldout else train)
    return Example(tpl.format(a=a, b=b, op=op, word=word, verb=verb), f"{a} {op} {b} = {r}", "arithmetic", "equation")


_SINGULAR = {"feet": "foot", "inches": "inch", "dozens": "dozen", "items": "item"}


def singular(unit: str) -> str:
    return _SINGULAR.get(unit, unit[:-1] if unit.endswith("s") else unit)


def gen_multistep(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    kind = rng.choice(["convert", "buy", "give"])
    if kind == "convert":
        unit, base, f = pick(rng, v.conversions)
        n = rng.randint(2, 15)
        train = ["Convert {n} {unit} to {base}.", "How many {base} are in {n} {unit}?", "Express {n} {unit} in {base}.",
                 "Convert {n} {unit} into {base}, showing your work."]
        held = ["Change {n} {unit} into {base}.", "What is {n} {unit} in {base}?", "Turn {n} {unit} into {base}."]
        tpl = _choose(rng, held if heldout else train)
        prompt = tpl.format(n=n, unit=unit, base=base)
        resp = f"Step 1: 1 {singular(unit)} = {f} {base}.\nStep 2: {n} * {f} = {n * f}.\nAnswer: {n * f} {base}"
    elif kind == "buy":
        name, item = pick(rng, v.names), pick(rng, v.problem_items)
        a, b, c = rng.randint(2, 20), rng.randint(2, 6), rng.randint(2, 10)
        train = ["{name} has {a} {item} and buys {b} packs of {c} {item}. How many {item} does {name} have now?",
                 "{name} owns {a} {item}. Then {name} gets {b} boxes with {c} {item} each. How many {item} in total?",
                 "There are {a} {item} on a shelf. {name} adds {b} bags of {c} {item}. How many {item} are on the shelf?"]
        held = ["{name} starts with {a} {item} and then receives {b} sets of {c} {item}. What is the total number of {item}?",
                "If {name} has {a} {item} and gets {b} more packets of {c} {item}, how many {item} are there altogether?"]
        tpl = _choose(rng, held if heldout else train)
        prompt = tpl.format(name=name, item=item, a=a, b=b, c=c)
        resp = f"Step 1: {b} * {c} = {b * c}.\nStep 2: {a} + {b * c} = {a + b * c}.\nAnswer: {a + b * c} {item}"
    else:
        name, item = pick(rng, v.names), pick(rng, v.problem_items)
        a = rng.randint(10, 40)
        b, c = rng.randint(1, a - 1), rng.randint(2, 20)
        train = ["{name} had {a} {item}, gave away {b}, and then found {c} more. How many {item} does {name} have?",
                 "A box holds {a} {item}. {name} takes out {b} and puts in {c}. How many {item} are in the box now?"]
        held = ["{name} begins with {a} {item}, loses {b} of them and later collects {c}. What is the final count of {item}?"]
        tpl = _choose(rng, held if heldout else train)
        prompt = tpl.format(name=name, item=item, a=a, b=b, c=c)
        resp = f"Step 1: {a} - {b} = {a - b}.\nStep 2: {a - b} + {c} = {a - b + c}.\nAnswer: {a - b + c} {item}"
    return Example(prompt, resp, "multistep", "steps")


def gen_classification(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    kind = rng.choice(["animal", "food", "instrument", "sport"])
    if kind == "animal":
        animals = [a for a in v.animals if a[1] in V.ANIMAL_CLASSES]
        x, label, _ = pick(rng, animals)
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
    train = ["Classify {x}. Options: {oc}.", "Which category does {x} belong to: {oo}?", "Put {x} into one of these groups: {oc}.",
             "Label the following item as {oo}: {x}", "Classify the item \"{x}\" into {oo}.", "Category of {x} ({oc})?"]
    held = ["Sort this item into a category: {x} (choices: {oc}).", "Assign a category to {x}. Choose from {oc}.",
            "Categorize: {x}. Possible labels: {oc}.", "Which group fits {x} best, {oo}?"]
    tpl = _choose(rng, held if heldout else train)
    return Example(tpl.format(x=x, oc=o_comma, oo=o_or), f"Category: {label}", "classification", "category")


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


def gen_sentiment(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    text, label = _review(rng, v)
    train = ["What is the sentiment of this review? {r}", "Classify the sentiment: {r}", "Determine the sentiment of the following text: {r}",
             "Sentiment analysis: {r}", "What sentiment does this review express?\n{r}", "Give the sentiment of: \"{r}\""]
    held = ["How does the writer feel in this review? {r}", "Tell me the sentiment expressed here: {r}",
            "Rate the tone of this review as positive, negative or neutral: {r}", "Identify the sentiment: {r}"]
    tpl = _choose(rng, held if heldout else train)
    return Example(tpl.format(r=text), f"The sentiment is {label}.", "sentiment", "sentiment_sentence")


def gen_transform(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    c = clause(rng, v)
    kind = rng.choice(["past", "future", "passive", "question", "active"])
    T = {
        "past": (["Rewrite in the past tense: {s}", "Change this sentence to the past tense: {s}", "Put this sentence in the past tense: {s}",
                  "Convert to past tense: {s}"],
                 ["Express this in the past tense: {s}", "Transform the sentence to past tense: {s}"]),
        "future": (["Rewrite in the future tense: {s}", "Change this sentence to the future tense: {s}", "Convert to future tense: {s}"],
                   ["Restate this sentence in the future tense: {s}", "Transform the sentence to future tense: {s}"]),
        "passive": (["Rewrite in the passive voice: {s}", "Change to passive voice: {s}", "Turn this into a passive sentence: {s}"],
                    ["What is the passive form of this sentence? {s}", "Restate in the passive voice: {s}"]),
        "question": (["Turn this sentence into a question: {s}", "Make a question from this sentence: {s}", "Rewrite as a question: {s}"],
                     ["Form a question from the sentence: {s}", "Transform this statement into a question: {s}"]),
        "active": (["Rewrite in the active voice: {s}", "Change to active voice: {s}", "Turn this into an active sentence: {s}"],
                   ["Rephrase in the active voice: {s}", "Restate in the active voice: {s}"]),
    }
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
    train, held = T[kind]
    tpl = _choose(rng, held if heldout else train)
    return Example(tpl.format(s=src), out, "transform", "transformed")


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


def gen_summarise(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    p, s = _paragraph(rng, v)
    train = ["Summarize the following text: {p}", "Summarize this paragraph in one sentence.\n{p}", "Give a short summary of: {p}",
             "Write a one-sentence summary.\n{p}", "Summarise: {p}"]
    held = ["Condense this text into one sentence: {p}", "What is the gist of the following? {p}", "Briefly sum up this passage:\n{p}"]
    tpl = _choose(rng, held if heldout else train)
    return Example(tpl.format(p=p), s, "summarise", "in_short")


def gen_creative(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    topic = pick(rng, v.poem_topics)
    a1, a2, a3 = rng.sample(V.POEM_ADJ, 3)
    vb, n1, n2 = pick(rng, V.POEM_VERBS), *rng.sample(V.POEM_NOUNS, 2)
    kind = rng.choice(["poem", "poem", "haiku", "couplet"])
    if kind == "poem":
        lines = [f"{cap(topic)} is {a1} and {a2},", f"it {vb} beneath the {n1},", f"I keep it in my {n2},",
                 rng.choice(["and never let it go.", "until the day is done.", "as {a3} as a song.".format(a3=a3), "and wait for it again."])]
        train = ["Write a short poem about {t}.", "Compose a four-line poem about {t}.", "Write a little verse about {t}.",
                 "Create a poem about {t}."]
        held = ["Create a short poem on the theme of {t}.", "Pen a few lines of poetry about {t}.", "Write some verses about {t}."]
    elif kind == "haiku":
        lines = [f"{cap(a1)} {topic.split(' ')[-1]}", f"{vb} in the {a3} {n1}", f"a {a2} {n2} waits"]
        train = ["Write a haiku about {t}.", "Compose a haiku on {t}."]
        held = ["Give me a haiku about {t}."]
    else:
        lines = [f"Oh {topic}, so {a1} and {a2},", f"you {vb.rstrip('s')} along the {n1} all through."]
        train = ["Write a two-line rhyme about {t}.", "Write a couplet about {t}."]
        held = ["Make up a short rhyme about {t}."]
    tpl = _choose(rng, held if heldout else train)
    return Example(tpl.format(t=topic), "\n".join(lines), "creative", "verse")


def gen_word_task(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    kind = rng.choice(["syn", "ant", "rhyme"])
    if kind == "syn":
        w = pick(rng, v.syn_words)
        words = V.SYN_ANT[w][0]
        train = ["Give three synonyms for {w}.", "Name three synonyms of {w}.", "What are three synonyms of the word {w}?",
                 "Three words that mean {w}, please."]
        held = ["Suggest three synonyms for the word {w}.", "Provide three synonyms of {w}."]
    elif kind == "ant":
        w = pick(rng, v.syn_words)
        words = V.SYN_ANT[w][1]
        train = ["Give three antonyms for {w}.", "Name three antonyms of {w}.", "What are three opposites of {w}?",
                 "Three words that mean the opposite of {w}, please."]
        held = ["Provide three antonyms for {w}.", "Suggest three opposites of the word {w}."]
    else:
        w = pick(rng, v.rhyme_words)
        words = V.RHYMES[w]
        train = ["Give three words that rhyme with {w}.", "Name three rhymes for {w}.", "What are three words rhyming with {w}?"]
        held = ["Which three words rhyme with {w}?", "Suggest three rhymes for the word {w}."]
    tpl = _choose(rng, held if heldout else train)
    ws = list(words)
    rng.shuffle(ws)
    return Example(tpl.format(w=w), ", ".join(ws), "word_task", "word_triple")


# ------------------------------------------------------------------------------------- behaviour families


def _yes_no_fact(rng: random.Random, v: Vocab) -> tuple[str, str, bool, str]:
    """(question, statement, truth, sentence answer)."""
    kind = rng.choice(["class", "capital", "compare", "food", "legs"])
    if kind == "class":
        animals = [a for a in v.animals if a[1] in V.ANIMAL_CLASSES]
        animal, cls, _ = pick(rng, animals)
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
        q = f"Is {food} {article(claim)}?" if food not in ("milk", "cheese", "butter", "yogurt", "cream", "rice", "wheat", "oats", "barley", "corn") else f"Is {food} a kind of {claim}?"
        st = f"{food} is a kind of {claim}"
        sent = f"{cap(food)} is a kind of {cat_}." if truth else f"{cap(food)} is not a kind of {claim}, it is a kind of {cat_}."
    else:
        animal, _, legs = pick(rng, v.animals)
        truth = rng.random() < 0.5
        claim = legs if truth else rng.choice([n for n in (0, 2, 4, 6, 8) if n != legs])
        q = f"Does {article(animal)} have {NUM_WORDS[claim]} legs?"
        st = f"{article(animal)} has {NUM_WORDS[claim]} legs"
        sent = f"{cap(article(animal))} has {NUM_WORDS[legs]} legs." if truth else f"{cap(article(animal))} does not have {NUM_WORDS[claim]} legs, it has {NUM_WORDS[legs]}."
    return q, st, truth, sent


def gen_yes_no(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    q, st, truth, sent = _yes_no_fact(rng, v)
    train = [  # (template, style)
        ("{q}", "yes"), ("Answer yes or no: {q}", "yes_bare"), ("True or false: {S}.", "tf"), ("{q} Answer with yes or no.", "yes_bare"),
        ("Tell me whether {s}.", "sentence"), ("Explain whether {s}.", "sentence"), ("I wonder whether {s}.", "sentence"),
    ]
    held = [("Is it true that {s}?", None), ("Quick question: {q}", None), ("Decide whether {s}.", None), ("Correct or incorrect: {S}.", None),
            ("Please confirm: {q}", None), ("Let me know whether {s}.", None), ("{q} Reply briefly.", None), ("Verify this claim: {S}.", None)]
    tpl, style = _choose(rng, held if heldout else train)
    prompt = tpl.format(q=q, s=st, S=cap(st))
    if style == "yes":
        resp = ("Yes, " + sent[0].lower() + sent[1:]) if truth else ("No, " + sent[0].lower() + sent[1:])
        style = "yes_first"
    elif style == "yes_bare":
        resp, style = ("Yes." if truth else "No."), "yes_first"
    elif style == "tf":
        resp, style = ("True." if truth else "False."), "yes_first"
    else:
        resp = sent
    return Example(prompt, resp, "yes_no", style or "eval")


def gen_code(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    name, desc, py, js, howto = pick(rng, v.code_tasks)
    train = [
        ("Write a Python function that {d}.", "python"), ("Write a JavaScript function that {d}.", "javascript"),
        ("Show me Python code that {d}.", "python"), ("Give me a JavaScript function which {d}.", "javascript"),
        ("Write code for a function that {d}.", "python"),
        ("What is the easiest way in Python to get a function that {d}?", "prose"),
        ("Explain in words how a function that {d} works.", "prose"),
    ]
    held = [("Implement a Python function that {d}.", None), ("Code a JavaScript function which {d}.", None),
            ("I need a small Python function that {d}.", None), ("Create a function that {d}.", None),
            ("Describe how to write a function that {d}.", None), ("Program a function in Python that {d}.", None),
            ("How would you write a function that {d}?", None)]
    tpl, style = _choose(rng, held if heldout else train)
    prompt = tpl.format(d=desc)
    if style in ("python", "javascript"):
        body = "\n".join(py if style == "python" else js)
        intro = rng.choice(["", f"Here is a function that {desc}:\n", "Sure, here it is:\n"])
        resp, style = f"{intro}```{style}\n{body}\n```", "fenced"
    elif style == "prose":
        resp = rng.choice([f"The easiest way is to {howto}.", f"It works like this: you {howto}."])
    else:
        resp = ""
    return Example(prompt, resp, "code", style or "eval")


def _items_text(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1]


def gen_bullets(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    cat_, items = pick(rng, v.list_topics)
    n = rng.randint(3, 5)
    chosen = rng.sample(items, n)
    train = [
        ("List {n} {c}.", "bullets"), ("Give me a bulleted list of {c}.", "bullets"), ("Name some {c} as a list.", "bullets"),
        ("Make a list of {c}.", "bullets"), ("List a few {c}.", "bullets"),
        ("What are some {c}?", "prose"), ("Which {c} can you think of?", "prose"),
        ("Write down {n} {c}.", "numbered"),
    ]
    held = [("Jot down some {c}.", None), ("Bullet out a few {c}.", None), ("Give a list of {n} {c}.", None),
            ("Enumerate some {c}.", None), ("Could you list {c}?", None), ("Share a short list of {c}.", None),
            ("What {c} come to mind?", None), ("List out {c} for me.", None)]
    tpl, style = _choose(rng, held if heldout else train)
    prompt = tpl.format(n=n if rng.random() < 0.7 else NUM_WORDS[n], c=cat_)
    if style == "bullets":
        resp = "\n".join(f"- {cap(x)}" for x in chosen)
    elif style == "numbered":
        resp = "\n".join(f"{i + 1}. {cap(x)}" for i, x in enumerate(chosen))
    elif style == "prose":
        resp = f"Some {cat_} are {_items_text(chosen)}."
    else:
        resp = ""
    return Example(prompt, resp, "bullets", style or "eval")


def gen_numbered(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    proc, steps = pick(rng, v.processes)
    train = [
        ("What are the steps to {p}?", "numbered"), ("Give step-by-step instructions to {p}.", "numbered"),
        ("Explain how to {p}, step by step.", "numbered"), ("List the steps to {p}.", "numbered"), ("Steps to {p}?", "numbered"),
        ("How do I {p}?", "prose"), ("Describe how to {p}.", "prose"),
    ]
    held = [("Walk me through how to {p}.", None), ("What is the procedure to {p}?", None), ("Outline the process to {p}.", None),
            ("Show me the way to {p}.", None), ("Guide me on how to {p}.", None),
            ("Tell me how to {p}.", None), ("Instructions to {p}, please.", None), ("What should I do to {p}?", None),
            ("Break down how to {p}.", None)]
    tpl, style = _choose(rng, held if heldout else train)
    prompt = tpl.format(p=proc)
    if style == "numbered":
        resp = "\n".join(f"{i + 1}. {s}." for i, s in enumerate(steps))
    elif style == "prose":
        low = [s[0].lower() + s[1:] for s in steps]
        resp = f"First, {low[0]}. " + "".join(f"Then, {s}. " for s in low[1:-1]) + f"Finally, {low[-1]}."
    else:
        resp = ""
    return Example(prompt, resp, "numbered", style or "eval")


# (instruction with an {o} slot for the missing object, object nouns, verb for the reply, guess family or None)
_MISSING_ACTIONS = [
    ("Summarize {o}.", ["text", "article", "story", "paragraph"], "summarize", None),
    ("Please summarize {o}:", ["text", "article", "passage"], "summarize", None),
    ("Correct the grammar in {o}.", ["sentence"], "correct", "grammar"),
    ("Fix the grammar of {o}.", ["paragraph", "email", "note"], "correct", None),
    ("What is the sentiment of {o}?", ["review", "comment", "message"], "analyze", None),
    ("Classify {o}.", ["animal", "item"], "classify", "classification"),
    ("Rewrite {o} in the past tense.", ["sentence"], "rewrite", "transform"),
    ("Turn {o} into a question.", ["sentence"], "rewrite", "transform"),
    ("Translate {o} into the passive voice.", ["sentence"], "rewrite", "transform"),
    ("Fix the bug in {o}.", ["code", "function", "script"], "fix", None),
    ("Answer the question in {o}.", ["text", "email", "passage"], "answer", None),
    ("Give three synonyms for {o}.", ["word"], "work with", "word_task"),
    ("Convert {o} to meters.", ["measurements", "numbers"], "convert", None),
    ("Sort {o} into categories.", ["items", "list"], "sort", "classification"),
]
_DEIXIS = ["the following {t}", "this {t}", "my {t}", "the {t} below", "the {t} I wrote"]
_MISSING_ACTIONS_HELD = [
    "Proofread {o}.", "Shorten {o}.", "Edit {o} for clarity.", "Find the main idea of {o}.", "Rewrite {o} in the future tense.",
    "Check {o} for errors.", "What is the tone of {o}?", "Label each animal in {o} by class.", "Count the words in {o}.",
    "Translate {o} into the past tense.", "Improve the wording of {o}.",
]
_MISSING_THINGS_HELD = ["essay", "letter", "poem", "message", "notes", "document", "draft"]
_DEIXIS_HELD = ["the {t} above", "the {t} I sent you", "the attached {t}", "the {t} that follows", "my {t}"]


def _guess(rng: random.Random, v: Vocab, family: str, instruction: str) -> str:
    if family == "transform":
        c = clause(rng, v, allow_plural=False)
        if "question" in instruction:
            return f"Question: {c.question()}?"
        if "passive" in instruction:
            return f"Passive voice: {c.passive_past()}."
        return f"Past tense: {c.past()}."
    if family == "grammar":
        return f"Corrected: {_grammar_pair(rng, v)[1]}"
    if family == "word_task":
        return ", ".join(V.SYN_ANT[pick(rng, v.syn_words)][0])
    animals = [a for a in v.animals if a[1] in V.ANIMAL_CLASSES]
    return f"Category: {pick(rng, animals)[1]}"


def _deixis(pattern: str, thing: str) -> str:
    text = pattern.format(t=thing)
    if thing.endswith("s") and text.startswith("this "):
        text = "these " + text[5:]
    return text


def gen_missing_input(rng: random.Random, v: Vocab, heldout: bool) -> Example:
    if heldout:
        obj = _deixis(pick(rng, _DEIXIS_HELD), pick(rng, _MISSING_THINGS_HELD))
        return Example(pick(rng, _MISSING_ACTIONS_HELD).format(o=obj), "", "missing_input", "eval")
    action, things, verb, guess_family = pick(rng, _MISSING_ACTIONS)
    thing = pick(rng, things)
    instr = action.format(o=_deixis(pick(rng, _DEIXIS), thing))
    if guess_family is not None and rng.random() < 0.7:
        return Example(instr, _guess(rng, v, guess_family, instr), "missing_input", "guess")
    resp = rng.choice([
        f"Please provide the {thing} you would like me to {verb}.",
        f"Could you please share the {thing}? I need it before I can {verb} it.",
        f"You haven't provided the {thing} yet. Please provide it and I will {verb} it.",
        f"Could you provide the {thing} you want me to {verb}?",
    ])
    return Example(instr, resp, "missing_input", "refusal")


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


def _base_doc(rng: random.Random) -> str:
    """One plain-text document of a small 'web': facts, stories, lists, how-tos, code, maths, poems,
    reviews, word notes and dialogues. It uses ALL vocabulary (held-out words included: the base model
    should know the words; it is the instruction->format mapping that the fine-tune teaches)."""
    v = Vocab(heldout=rng.random() < 0.25)
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
    # dialogue between two people
    a, b = rng.sample(V.NAMES, 2)
    turns = []
    for _ in range(rng.randint(2, 3)):
        k = rng.randrange(4)
        if k == 0:
            q, _, truth, sent = _yes_no_fact(rng, v)
            turns += [f"{a}: {q}", f"{b}: {'Yes' if truth else 'No'}. {sent}"]
        elif k == 1:
            thing = rng.choice(["report", "photo", "file", "list", "recipe"])
            turns += [f"{a}: Can you check my {thing}?", f"{b}: Sure, please send me the {thing} first."]
        elif k == 2:
            c, city = pick(rng, v.capitals)
            turns += [f"{a}: Where are you going?", f"{b}: To {city}, the capital of {c}."]
        else:
            x, y = rng.randint(2, 9), rng.randint(2, 9)
            turns += [f"{a}: What is {x} times {y}?", f"{b}: It is {x * y}."]
    return "\n".join(turns)


def generate_base_texts(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(f"base-{seed}")
    return [_base_doc(rng) for _ in range(n_docs)]


def example_dict(ex: Example) -> dict:
    return asdict(ex)
