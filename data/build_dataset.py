"""Build ``compsent``: a constructed, compositional binary sentiment data set.

Every example is a short review sentence about one aspect (or two aspects) of a restaurant,
film, book, hotel, gadget, video game, flight, concert or course.  Its label (0 = negative,
1 = positive) is decided by rules, so it is noise-free by construction:

* the prior polarity of the sentiment word (adjective, verb or "I was X with ..." participle),
  taken from the hand-written lexicon below (every word that the VADER lexicon also rates has
  the same sign there, see ``--check-vader``);
* flipped by a negating frame ("not", "wasn't", "hardly", "far from", "anything but",
  "I wouldn't call ...", "there was nothing X about ...");
* kept by frames that *look* negative but are not ("could not have been more X",
  "nothing short of X", "I can't deny that ...");
* for two clauses of opposite polarity joined by a contrast ("X, but Y", "although X, Y",
  "Y, even though X"), the main clause (the one after "but", or the one not introduced by
  "although" / "though" / "even if") wins; two clauses of the same polarity are joined with
  "and".

Every example and every lexicon word are balanced so that neither the words of a sentence nor
the presence of a negator predict the label on their own: the task needs composition, which a
linear probe on mean-pooled frozen embeddings does poorly and a fine-tuned encoder learns.

Held-out splits: sentiment words are partitioned into disjoint train / validation / test sets
(per category and polarity), and 17 frames and connectives (paraphrases of ones that train
has, ``HELDOUT_FRAMES``) are used only in validation and test.  Every sentence contains at least
one sentiment word, so no held-out sentence can be a near-duplicate of a training sentence: it
always carries a sentiment word that no training text contains (``verify`` asserts this), often
in a frame that train never uses.

Usage (offline, deterministic; the same seed gives byte-identical files)::

    python data/build_dataset.py                 # writes data/compsent/
    python data/build_dataset.py --check-vader   # also cross-check the lexicon with VADER
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

NAME = "compsent"
LABELS = ["negative", "positive"]
SIZES = {"train": 3000, "validation": 500, "test": 1000}
SEED = 20240611

# Fractions of the sentiment words (per category and polarity) that go to each split.
WORD_SPLIT = {"train": 0.6, "validation": 0.15, "test": 0.25}
# Words that stay in train: the most common ones, so that "not bad" / "not good" are taught.
PINNED_TRAIN = {"good", "bad", "great", "terrible", "nice", "awful", "loved", "hated", "liked"}
# Frames used only in validation and test: each is a paraphrase of frames that train has (the
# same operator in other words), so held-out sentences test generalisation to new wordings.
HELDOUT_FRAMES = {
    "{A} struck me as {int}{adj}",  # ~ "{A} seemed ...", "I found {A} ..."
    "everyone said {A} {be} {int}{adj}",  # ~ "my friends agreed that ..."
    "{A} {be} in no way {adj}",  # ~ "by no means", "not at all"
    "it would be wrong to call {A} {adj}",  # ~ "I wouldn't call ..."
    "{A} never seemed {adj}",  # ~ "{A} {be} never ..."
    "{A} did not strike me as {nint}{adj}",  # ~ "I didn't find ..."
    "nobody could deny that {A} {be} {int}{adj}",  # ~ "I can't deny that ..."
    "there is no denying that {A} {be} {int}{adj}",  # ~ "there's no question that ..."
    "nobody in our group {vpast} {A}",  # ~ "nobody was ...", "I never ..."
    "my whole family {vpast} {A}",  # ~ "we {vpast} ..."
    "there's no denying that I {vpast} {A}",  # ~ "I can't deny that I ..."
    "we were hardly {feel} {prep} {A}",  # ~ "I was never ...", "hardly" (adjectives)
    "I came away {fint}{feel} {prep} {A}",  # ~ "I left ..."
    "{main}, even if {sub}",  # ~ "{main}, even though {sub}"
    "{sub}. Even so, {main}",  # ~ "{sub}. Still, {main}"
    "granted, {sub}, but {main}",  # ~ "sure, {sub}, but {main}"
    "{c1}. Likewise, {c2}",  # ~ "{c1}; also, {c2}"
}
# In validation and test, a held-out frame is this many times as likely as a training frame.
HELDOUT_WEIGHT = 2

# Share of each sentence kind in every split (labels are balanced within each kind).
KINDS = {
    "plain": 0.18,  # one clause, no negation
    "negated": 0.27,  # one clause, negated
    "fake_negation": 0.10,  # one clause with a negative-looking but polarity-keeping frame
    "contrast": 0.35,  # two clauses of opposite polarity, a contrast connective
    "agree": 0.10,  # two clauses of the same polarity joined with "and"
}


def _words(text):
    return text.split()


# --------------------------------------------------------------------------------------------
# Lexicon: category -> (positive words, negative words).  Hand-written for this data set.
# --------------------------------------------------------------------------------------------
ADJ = {
    "generic": (
        "good great excellent wonderful fantastic superb terrific outstanding impressive lovely "
        "brilliant marvelous delightful pleasant enjoyable satisfying nice remarkable exceptional "
        "splendid perfect amazing awesome stellar fabulous admirable phenomenal magnificent "
        "solid decent impeccable flawless memorable sublime first-rate top-notch",
        "bad terrible awful horrible dreadful poor disappointing mediocre lousy abysmal atrocious "
        "pathetic subpar unacceptable appalling woeful miserable dismal shoddy lackluster "
        "underwhelming frustrating annoying unpleasant inferior second-rate deplorable crummy "
        "horrendous disastrous unbearable sloppy amateurish embarrassing dire",
    ),
    "people": (
        "friendly helpful courteous polite attentive welcoming professional warm kind "
        "knowledgeable patient gracious cheerful accommodating considerate respectful",
        "rude unhelpful dismissive impolite arrogant careless incompetent hostile unfriendly "
        "condescending inattentive lazy grumpy disrespectful clueless surly",
    ),
    "food": (
        "delicious tasty flavorful fresh scrumptious savory mouthwatering succulent delectable "
        "appetizing hearty yummy",
        "bland tasteless stale greasy soggy overcooked inedible flavorless undercooked burnt "
        "watery rubbery unappetizing disgusting",
    ),
    "story": (
        "gripping moving captivating engaging compelling riveting witty clever charming thrilling "
        "absorbing entertaining original inventive touching imaginative",
        "boring dull tedious predictable clumsy lifeless tiresome forgettable confusing "
        "uninspired pointless flat monotonous derivative pretentious plodding",
    ),
    "place": (
        "clean spacious comfortable cozy tidy quiet spotless bright airy inviting peaceful "
        "well-kept",
        "dirty cramped noisy filthy shabby dingy stuffy grimy uncomfortable smelly gloomy "
        "run-down musty",
    ),
    "device": (
        "reliable sturdy fast responsive durable intuitive sleek powerful smooth snappy "
        "well-built efficient seamless",
        "flimsy slow unreliable buggy sluggish fragile clunky glitchy laggy faulty defective "
        "unstable unresponsive",
    ),
}
# Non-gradable adjectives: no "very"/"quite" in front of them.
EXTREME = set(
    _words(
        "perfect flawless impeccable sublime phenomenal magnificent first-rate top-notch superb "
        "outstanding exceptional amazing awesome fantastic terrific stellar fabulous brilliant "
        "marvelous splendid abysmal atrocious appalling horrendous disastrous unbearable inedible "
        "second-rate unacceptable dire deplorable woeful spotless filthy defective"
    )
)
# (past tense, base form) -- all regular, so the past participle equals the past tense.
VERBS = (
    [
        ("loved", "love"),
        ("enjoyed", "enjoy"),
        ("liked", "like"),
        ("adored", "adore"),
        ("appreciated", "appreciate"),
        ("admired", "admire"),
    ],
    [
        ("hated", "hate"),
        ("disliked", "dislike"),
        ("detested", "detest"),
        ("despised", "despise"),
        ("loathed", "loathe"),
    ],
)
# "I was X with/by the ..." participles, with their preposition.
FEELINGS = (
    [
        ("pleased", "with"),
        ("delighted", "with"),
        ("satisfied", "with"),
        ("impressed", "by"),
        ("thrilled", "with"),
        ("blown away", "by"),
        ("charmed", "by"),
    ],
    [
        ("disappointed", "with"),
        ("annoyed", "by"),
        ("frustrated", "with"),
        ("unimpressed", "by"),
        ("irritated", "by"),
        ("dissatisfied", "with"),
        ("disgusted", "by"),
        ("appalled", "by"),
    ],
)

# --------------------------------------------------------------------------------------------
# Domains: aspect phrase, plural?, adjective categories that fit it; and neutral openers.
# --------------------------------------------------------------------------------------------
G = ("generic",)
DOMAINS = {
    "restaurant": {
        "aspects": [
            ("the food", False, ("generic", "food")),
            ("the pasta", False, ("generic", "food")),
            ("the soup", False, ("generic", "food")),
            ("the dessert", False, ("generic", "food")),
            ("the steak", False, ("generic", "food")),
            ("the curry", False, ("generic", "food")),
            ("the service", False, G),
            ("the waiter", False, ("generic", "people")),
            ("the staff", True, ("generic", "people")),
            ("the atmosphere", False, G),
            ("the dining room", False, ("generic", "place")),
        ],
        "openers": [
            "We had dinner at {name} on Friday.",
            "I took my parents to {name} for lunch.",
            "We tried {name} last weekend.",
            "I ate at {name} twice this month.",
        ],
        "names": ["Luigi's", "the Golden Lantern", "Casa Marina", "the Blue Door Bistro", "Sakura"],
    },
    "film": {
        "aspects": [
            ("the film", False, ("generic", "story")),
            ("the movie", False, ("generic", "story")),
            ("the plot", False, ("generic", "story")),
            ("the script", False, ("generic", "story")),
            ("the acting", False, G),
            ("the ending", False, ("generic", "story")),
            ("the dialogue", False, ("generic", "story")),
            ("the soundtrack", False, G),
            ("the lead actors", True, G),
        ],
        "openers": [
            "I watched {name} last night.",
            "We saw {name} at the cinema.",
            "I finally got around to {name}.",
            "My friend recommended {name}.",
        ],
        "names": ["Glass Horizon", "The Quiet Field", "Northern Lights", "The Long Winter"],
    },
    "book": {
        "aspects": [
            ("the novel", False, ("generic", "story")),
            ("the book", False, ("generic", "story")),
            ("the characters", True, ("generic", "story")),
            ("the writing", False, ("generic", "story")),
            ("the story", False, ("generic", "story")),
            ("the final chapter", False, ("generic", "story")),
        ],
        "openers": [
            "I read {name} on holiday.",
            "Our book club picked {name} this month.",
            "I finished {name} yesterday.",
        ],
        "names": ["The Salt Road", "A House of Clocks", "Paper Rivers", "The Ninth Bell"],
    },
    "hotel": {
        "aspects": [
            ("the room", False, ("generic", "place")),
            ("the hotel", False, ("generic", "place")),
            ("the lobby", False, ("generic", "place")),
            ("the bathroom", False, ("generic", "place")),
            ("the breakfast", False, ("generic", "food")),
            ("the staff", True, ("generic", "people")),
            ("the receptionist", False, ("generic", "people")),
            ("the pool area", False, ("generic", "place")),
        ],
        "openers": [
            "We stayed at {name} for three nights.",
            "I booked a room at {name} for a conference.",
            "We spent our honeymoon at {name}.",
        ],
        "names": ["the Harbor Inn", "Hotel Aurora", "the Grand Meridian", "Pine Lodge"],
    },
    "gadget": {
        "aspects": [
            ("the phone", False, ("generic", "device")),
            ("the laptop", False, ("generic", "device")),
            ("the battery", False, ("generic", "device")),
            ("the camera", False, ("generic", "device")),
            ("the app", False, ("generic", "device")),
            ("the headphones", True, ("generic", "device")),
            ("the keyboard", False, ("generic", "device")),
            ("the customer support", False, ("generic", "people")),
            ("the software", False, ("generic", "device")),
        ],
        "openers": [
            "I bought {name} a month ago.",
            "I have been using {name} for two weeks.",
            "My sister gave me {name} for my birthday.",
        ],
        "names": ["the Nova X2", "the Zephyr tablet", "a new Orion laptop", "the Pulse earbuds"],
    },
    "game": {
        "aspects": [
            ("the game", False, ("generic", "story")),
            ("the gameplay", False, ("generic", "device")),
            ("the controls", True, ("generic", "device")),
            ("the graphics", True, G),
            ("the story mode", False, ("generic", "story")),
            ("the multiplayer", False, ("generic", "device")),
        ],
        "openers": [
            "I played {name} all weekend.",
            "I picked up {name} on sale.",
        ],
        "names": ["Starfall Tactics", "Ember Keep", "Drift Racer", "Hollow Crown"],
    },
    "flight": {
        "aspects": [
            ("the flight", False, G),
            ("the crew", False, ("generic", "people")),
            ("the seats", True, ("generic", "place")),
            ("the cabin", False, ("generic", "place")),
            ("the meal", False, ("generic", "food")),
            ("the boarding process", False, G),
        ],
        "openers": [
            "I flew with {name} to Lisbon.",
            "We took {name} for our trip home.",
        ],
        "names": ["Skyline Air", "Coastal Airways", "Northwind Airlines"],
    },
    "concert": {
        "aspects": [
            ("the concert", False, G),
            ("the band", False, G),
            ("the performance", False, ("generic", "story")),
            ("the venue", False, ("generic", "place")),
            ("the sound", False, G),
            ("the opening act", False, ("generic", "story")),
            ("the security staff", True, ("generic", "people")),
        ],
        "openers": [
            "We saw {name} live on Saturday.",
            "I went to see {name} downtown.",
        ],
        "names": ["the Velvet Owls", "Marlowe", "the Paper Kites Trio"],
    },
    "course": {
        "aspects": [
            ("the course", False, ("generic", "story")),
            ("the lectures", True, ("generic", "story")),
            ("the instructor", False, ("generic", "people")),
            ("the exercises", True, ("generic", "story")),
            ("the teaching assistants", True, ("generic", "people")),
            ("the classroom", False, ("generic", "place")),
        ],
        "openers": [
            "I took {name} this spring.",
            "I signed up for {name} at the community college.",
        ],
        "names": ["the evening photography course", "an online Spanish course", "Data 101"],
    },
}

INTRO_PREFIXES = ["", "", "", "", "Honestly, ", "To be honest, ", "In my opinion, ", "Frankly, "]

# --------------------------------------------------------------------------------------------
# Frames.  {A} = capitalisable aspect, {be} was/were, {bent} wasn't/weren't, {int} intensifier.
# --------------------------------------------------------------------------------------------
ADJ_PLAIN = [
    "{A} {be} {int}{adj}",
    "I found {A} {int}{adj}",
    "{A} turned out to be {int}{adj}",
    "{A} seemed {int}{adj}",
    "I thought {A} {be} {int}{adj}",
    "{A} {be} consistently {adj}",
    "{A} felt {int}{adj}",
    "{A} {be} always {adj}",
    "my friends agreed that {A} {be} {int}{adj}",
    "{A} struck me as {int}{adj}",
    "{A} {be} {int}{adj} from start to finish",
    "everyone said {A} {be} {int}{adj}",
]
ADJ_NEGATED = [
    "{A} {be} not {nint}{adj}",
    "{A} {bent} {nint}{adj}",
    "{A} {be} never {adj}",
    "{A} {be} hardly {adj}",
    "{A} {be} far from {adj}",
    "{A} {be} anything but {adj}",
    "{A} {be} not at all {adj}",
    "{A} {be} by no means {adj}",
    "{A} {be} in no way {adj}",
    "I didn't find {A} {nint}{adj}",
    "I wouldn't call {A} {adj}",
    "I can't say {A} {be} {nint}{adj}",
    "nobody would describe {A} as {adj}",
    "I don't think {A} {be} {nint}{adj}",
    "there was nothing {adj} about {A}",
    "{A} {be} not the least bit {adj}",
    "{A} never seemed {adj}",
    "{A} did not strike me as {nint}{adj}",
    "{A} {bent} what I would call {adj}",
    "it would be wrong to call {A} {adj}",
]
ADJ_FAKE_NEG = [
    "{A} could not have been more {adj}",  # only for long adjectives, see _fits
    "{A} {be} nothing short of {adj}",
    "I can't deny that {A} {be} {int}{adj}",
    "there's no question that {A} {be} {int}{adj}",
    "nobody could deny that {A} {be} {int}{adj}",
    "I wouldn't hesitate to call {A} {adj}",
    "{A} never stopped being {adj}",
    "I can't stress enough how {adj} {A} {be}",
    "there is no denying that {A} {be} {int}{adj}",
    "{A} {be} {int}{adj}, no doubt about it",
    "I have no doubt that {A} {be} {int}{adj}",
    "it's not an exaggeration to say {A} {be} {adj}",
]
VERB_PLAIN = [
    "I {vpast} {A}",
    "I really {vpast} {A}",
    "we {vpast} {A}",
    "I honestly {vpast} {A}",
    "my whole family {vpast} {A}",
]
VERB_NEGATED = [
    "I did not {vbase} {A}",
    "I didn't {vbase} {A}",
    "we didn't {vbase} {A} at all",
    "I never {vpast} {A}",
    "nobody in our group {vpast} {A}",
    "I can't say I {vpast} {A}",
]
VERB_FAKE_NEG = [
    "I couldn't help but {vbase} {A}",
    "I could not have {vpast} {A} more",
    "there's no denying that I {vpast} {A}",
    "I can't deny that I {vpast} {A}",
]
FEEL_PLAIN = [
    "I was {fint}{feel} {prep} {A}",
    "we were {fint}{feel} {prep} {A}",
    "I came away {fint}{feel} {prep} {A}",
    "I left {fint}{feel} {prep} {A}",
]
FEEL_NEGATED = [
    "I was not {nint}{feel} {prep} {A}",
    "I wasn't {nint}{feel} {prep} {A}",
    "we were hardly {feel} {prep} {A}",
    "I was never {feel} {prep} {A}",
    "nobody was {feel} {prep} {A}",
]
FEEL_FAKE_NEG = [
    "I could not have been more {feel} {prep} {A}",
    "I can't deny that I was {feel} {prep} {A}",
    "there's no question I was {fint}{feel} {prep} {A}",
]
# Contrast connectives: (template, the clause that decides the label is always {main}).
CONTRAST = [
    "{sub}, but {main}",
    "{sub}; however, {main}",
    "{sub}, yet {main}",
    "although {sub}, {main}",
    "even though {sub}, {main}",
    "while {sub}, {main}",
    "{main}, although {sub}",
    "{main}, even though {sub}",
    "{main}, though {sub}",
    "{main}, even if {sub}",
    "sure, {sub}, but {main}",
    "{sub}. Still, {main}",
    "{sub}, but in the end {main}",
    "{main}, despite the fact that {sub}",
    "granted, {sub}, but {main}",
    "{sub}. Even so, {main}",
]
AGREE = [
    "{c1}, and {c2}",
    "{c1}, and {c2} too",
    "{c1}, and on top of that {c2}",
    "{c1}; also, {c2}",
    "{c1}, and what's more, {c2}",
    "{c1}. Likewise, {c2}",
]

INT_GRADABLE = ["very ", "really ", "extremely ", "incredibly ", "truly ", "quite ", "genuinely "]
INT_GRADABLE += ["remarkably ", "pretty ", "rather ", "so ", "fairly ", "somewhat "]
INT_EXTREME = ["absolutely ", "truly ", "simply ", "utterly "]
NINT_GRADABLE = ["very ", "really ", "particularly ", "especially ", "all that ", "terribly "]
NINT_EXTREME = ["exactly ", "quite ", "really "]
FINT = ["very ", "really ", "extremely ", "thoroughly ", "genuinely ", "quite "]
NFINT = ["very ", "really ", "particularly ", "especially ", "all that "]


def _split_items(items, rng, pinned=()):
    """Partition ``items`` into train / validation / test (disjoint, each non-empty)."""
    items = sorted(items)
    rng.shuffle(items)
    pinned_items = [w for w in items if _key(w) in pinned]
    rest = [w for w in items if _key(w) not in pinned]
    n = len(items)
    n_val = max(1, round(n * WORD_SPLIT["validation"]))
    n_test = max(1, round(n * WORD_SPLIT["test"]))
    n_train = n - n_val - n_test
    assert n_train >= len(pinned_items) and n_train >= 1, items
    train = pinned_items + rest[: n_train - len(pinned_items)]
    rest = rest[n_train - len(pinned_items) :]
    return {"train": train, "validation": rest[:n_val], "test": rest[n_val:]}


def _key(item):
    return item[0] if isinstance(item, tuple) else item


def _split_frames(frames):
    """Return the frames used in train, and those used in validation and test."""
    held = [f for f in frames if f in HELDOUT_FRAMES]
    return {
        "train": [f for f in frames if f not in HELDOUT_FRAMES],
        "heldout": held,
        "eval": frames + held * (HELDOUT_WEIGHT - 1),
    }


class Builder:
    def __init__(self, seed: int):
        rng = random.Random(seed)
        self.lex = {}  # (category, polarity) -> {split: [words]}
        for cat in sorted(ADJ):
            for pol, words in ((1, ADJ[cat][0]), (0, ADJ[cat][1])):
                self.lex[("adj", cat, pol)] = _split_items(words.split(), rng, PINNED_TRAIN)
        for pol in (1, 0):
            self.lex[("verb", pol)] = _split_items(VERBS[1 - pol], rng, PINNED_TRAIN)
            self.lex[("feel", pol)] = _split_items(FEELINGS[1 - pol], rng)
        names = [
            "ADJ_PLAIN ADJ_NEGATED ADJ_FAKE_NEG VERB_PLAIN VERB_NEGATED VERB_FAKE_NEG",
            "FEEL_PLAIN FEEL_NEGATED FEEL_FAKE_NEG CONTRAST AGREE",
        ]
        self.frames = {n: _split_frames(globals()[n]) for n in " ".join(names).split()}
        held = {f for v in self.frames.values() for f in v["heldout"]}
        assert held == HELDOUT_FRAMES, HELDOUT_FRAMES - held
        self.rng = random.Random(seed + 1)

    # ---------------------------------------------------------------------------------------
    def frames_for(self, name, split):
        f = self.frames[name]
        return f["train"] if split == "train" else f["eval"]

    def clause(self, split, aspect, polarity, mode):
        """A clause about ``aspect`` whose effective polarity is ``polarity``.

        ``mode`` is plain / negated / fake_negation.  Returns (text, words used).
        """
        rng = self.rng
        phrase, plural, cats = aspect
        word_pol = 1 - polarity if mode == "negated" else polarity
        kind = rng.choices(["adj", "verb", "feel"], weights=[0.7, 0.15, 0.15])[0]
        suffix = {"plain": "PLAIN", "negated": "NEGATED", "fake_negation": "FAKE_NEG"}[mode]
        if kind == "adj":
            cat = rng.choice(cats)
            words = self.lex[("adj", cat, word_pol)][split]
            for _ in range(50):
                adj = rng.choice(words)
                frame = rng.choice(self.frames_for("ADJ_" + suffix, split))
                if _fits(frame, adj):
                    break
            else:  # pragma: no cover - the frame lists always have a fitting frame
                raise RuntimeError("no frame fits " + adj)
            text = frame.format(
                A=phrase,
                be="were" if plural else "was",
                bent="weren't" if plural else "wasn't",
                adj=adj,
                int=_pick_int(rng, adj, INT_EXTREME, INT_GRADABLE, 0.35),
                nint=_pick_int(rng, adj, NINT_EXTREME, NINT_GRADABLE, 0.3),
            )
            return text, [adj]
        if kind == "verb":
            vpast, vbase = rng.choice(self.lex[("verb", word_pol)][split])
            frame = rng.choice(self.frames_for("VERB_" + suffix, split))
            return frame.format(A=phrase, vpast=vpast, vbase=vbase), [vpast]
        feel, prep = rng.choice(self.lex[("feel", word_pol)][split])
        frame = rng.choice(self.frames_for("FEEL_" + suffix, split))
        fint = rng.choice(FINT) if rng.random() < 0.3 and feel != "blown away" else ""
        nint = rng.choice(NFINT) if rng.random() < 0.3 and feel != "blown away" else ""
        return frame.format(A=phrase, feel=feel, prep=prep, fint=fint, nint=nint), [feel]

    def clause_mode(self):
        return self.rng.choices(["plain", "negated", "fake_negation"], [0.45, 0.4, 0.15])[0]

    def example(self, split, kind, label):
        rng = self.rng
        domain = DOMAINS[rng.choice(sorted(DOMAINS))]
        if kind in ("plain", "negated", "fake_negation"):
            aspect = rng.choice(domain["aspects"])
            text, _ = self.clause(split, aspect, label, kind)
            r = rng.random()
            if r < 0.25:
                opener = rng.choice(domain["openers"]).format(name=rng.choice(domain["names"]))
                return opener + " " + _sentence(text)
            if r < 0.45:
                return _sentence(rng.choice(INTRO_PREFIXES) + text)
            return _sentence(text)
        a1, a2 = rng.sample(domain["aspects"], 2)
        if kind == "contrast":
            main, _ = self.clause(split, a1, label, self.clause_mode())
            sub, _ = self.clause(split, a2, 1 - label, self.clause_mode())
            frame = rng.choice(self.frames_for("CONTRAST", split))
            return _sentence(frame.format(main=main, sub=sub))
        c1, _ = self.clause(split, a1, label, self.clause_mode())
        c2, _ = self.clause(split, a2, label, self.clause_mode())
        frame = rng.choice(self.frames_for("AGREE", split))
        return _sentence(frame.format(c1=c1, c2=c2))

    def build(self):
        out = {}
        seen = set()
        for split, size in SIZES.items():
            rows = []
            for kind, n in _kind_counts(size).items():
                for label in (0, 1):
                    made = 0
                    while made < n // 2:
                        text = self.example(split, kind, label)
                        if text.lower() in seen:
                            continue
                        seen.add(text.lower())
                        rows.append({"text": text, "label": label, "kind": kind})
                        made += 1
            assert len(rows) == size
            self.rng.shuffle(rows)
            out[split] = rows
        return out


def verify(splits, lexicon):
    """Check that validation and test share no sentence and no sentiment word with train."""
    train_texts = {r["text"].lower() for r in splits["train"]}
    train_words = set(re.findall(r"[a-z'-]+", " ".join(sorted(train_texts))))
    for split in ("validation", "test"):
        assert not train_texts & {r["text"].lower() for r in splits[split]}, split
        leaked = [w for w in lexicon[split] if all(p in train_words for p in w.split())]
        assert not leaked, (split, leaked)
        assert not set(lexicon[split]) & set(lexicon["train"]), split
    assert not set(lexicon["validation"]) & set(lexicon["test"])


def _kind_counts(size):
    """Even example counts per kind (for exact label balance) that add up to ``size``."""
    assert size % 2 == 0
    counts = {k: int(size * share / 2) * 2 for k, share in KINDS.items()}
    for k in sorted(KINDS, key=lambda k: -KINDS[k]):
        if sum(counts.values()) < size:
            counts[k] += 2
    assert sum(counts.values()) == size, counts
    return counts


def _fits(frame, adj):
    if "could not have been more" in frame:
        return len(adj) >= 8 and "-" not in adj and adj not in EXTREME
    return True


def _pick_int(rng, adj, extreme, gradable, p):
    if rng.random() >= p:
        return ""
    return rng.choice(extreme if adj in EXTREME or "-" in adj else gradable)


def _sentence(text):
    text = text[0].upper() + text[1:]
    # Capitalise after a full stop inside the text ("... Still, ...") is already in the frame.
    return text + ("!" if hash_mod(text, 9) == 0 else ".")


def hash_mod(text, m):
    """A deterministic (not PYTHONHASHSEED-dependent) small hash."""
    h = 0
    for ch in text:
        h = (h * 131 + ord(ch)) % 1_000_003
    return h % m


def check_vader():
    """Compare the lexicon with VADER's (``pip install vaderSentiment``); print mismatches."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        print("vaderSentiment is not installed: pip install vaderSentiment==3.3.2")
        return False
    vader = SentimentIntensityAnalyzer().lexicon
    found = mismatched = total = 0
    for cat, (pos, neg) in sorted(ADJ.items()):
        for pol, words in ((1, pos.split()), (-1, neg.split())):
            for w in words:
                total += 1
                if w in vader:
                    found += 1
                    if vader[w] * pol <= 0:
                        mismatched += 1
                        print(f"  mismatch: {cat} {w!r} lexicon={pol:+d} vader={vader[w]:+.1f}")
    for pol, items in ((1, VERBS[0] + FEELINGS[0]), (-1, VERBS[1] + FEELINGS[1])):
        for w, _ in items:
            total += 1
            v = vader.get(w.split()[0] if w != "blown away" else "", None)
            if v is not None:
                found += 1
                if v * pol <= 0:
                    mismatched += 1
                    print(f"  mismatch: {w!r} lexicon={pol:+d} vader={v:+.1f}")
    print(f"VADER cross-check: {total} words, {found} rated by VADER, {mismatched} disagree")
    return mismatched == 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / NAME)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--check-vader", action="store_true")
    args = p.parse_args(argv)
    if args.check_vader and not check_vader():
        return 1
    builder = Builder(args.seed)
    splits = builder.build()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(args.out / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for r in rows:
                f.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")
    (args.out / "labels.json").write_text(json.dumps(LABELS) + "\n", encoding="utf-8")
    lexicon = {s: sorted({w for v in builder.lex.values() for w in map(_key, v[s])}) for s in SIZES}
    verify(splits, lexicon)
    meta = {
        "seed": args.seed,
        "kinds": {s: [r["kind"] for r in rows] for s, rows in splits.items()},
        "lexicon": lexicon,
        "heldout_frames": {k: v["heldout"] for k, v in sorted(builder.frames.items())},
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    for split, rows in splits.items():
        c = Counter(r["label"] for r in rows)
        print(f"{split}: {len(rows)} examples, labels {dict(sorted(c.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
