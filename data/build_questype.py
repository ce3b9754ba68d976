"""Build ``questype``: a constructed question-type (expected answer type) classification set.

Every example is one English question (or request) about an event: someone did something,
somewhere, at some time. Its label is the type of answer that the *main* question asks for:
``person`` (who did it), ``location`` (where), ``time`` (when) or ``number`` (how many / how
much). The label is decided by the frame of the main clause, so it is noise-free by
construction. What makes it more than spotting a question word:

* distractors: most questions also carry modifiers that mention the other answer types, many
  of them with the same wh-words in relative or fronted clauses ("the architect *who* grew up in
  Varnholm", "in the town *where* the war ended", "*when* the storm was over", "with *twelve*
  volunteers"), so every wh-word and every kind of entity occurs under every label;
* wrapped questions (60 %): an indirect question inside a request whose own wh-word is drawn
  independently of the label ("*Who* can tell me *where* the painter ...?" is ``location``,
  "*How many* of you remember *when* ...?" is ``time``), so the first question word is often
  the wrong one;
* indirect requests ("Tell me the year in which ...", "I wonder who ...", "Do you know how many
  ...") and "which / what + noun" questions ("Which harbour town did ...", "In what decade ..."),
  where the type is carried by a noun rather than the question word;
* held-out splits: the event phrases (verb + object) and the focus nouns of the "which X"
  frames are partitioned into disjoint train / validation / test sets, and 6 direct frames and
  5 wrappers (paraphrases of train's) appear only in validation and test.

A linear probe on frozen mean-pooled sentence embeddings mixes the main question word with the
distractors' ones and does clearly worse than a fine-tuned encoder (see ``README.md``).

Usage (offline, deterministic; the same seed gives byte-identical files)::

    python data/build_questype.py                # writes data/questype/
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

NAME = "questype"
LABELS = ["person", "location", "time", "number"]
SIZES = {"train": 2000, "validation": 400, "test": 800}
SEED = 20261201
PART = {"train": 0.6, "validation": 0.15, "test": 0.25}

# Event phrases: (base form, past form, plural object noun for "how many" questions).
EVENTS = [
    ("open the new library", "opened the new library", "books"),
    ("design the footbridge", "designed the footbridge", "bridges"),
    ("write the famous novel", "wrote the famous novel", "novels"),
    ("win the chess tournament", "won the chess tournament", "games"),
    ("paint the harbour mural", "painted the harbour mural", "murals"),
    ("found the shipping company", "founded the shipping company", "companies"),
    ("discover the comet", "discovered the comet", "comets"),
    ("build the observatory", "built the observatory", "telescopes"),
    ("record the debut album", "recorded the debut album", "songs"),
    ("climb the north face", "climbed the north face", "peaks"),
    ("direct the silent film", "directed the silent film", "films"),
    ("invent the folding bicycle", "invented the folding bicycle", "patents"),
    ("translate the old poems", "translated the old poems", "poems"),
    ("restore the cathedral", "restored the cathedral", "windows"),
    ("sign the peace treaty", "signed the peace treaty", "treaties"),
    ("launch the weather satellite", "launched the weather satellite", "satellites"),
    ("plant the city orchard", "planted the city orchard", "trees"),
    ("coach the national team", "coached the national team", "matches"),
    ("publish the first atlas", "published the first atlas", "maps"),
    ("compose the symphony", "composed the symphony", "symphonies"),
    ("rescue the stranded hikers", "rescued the stranded hikers", "hikers"),
    ("map the underground river", "mapped the underground river", "caves"),
    ("bake the wedding cake", "baked the wedding cake", "cakes"),
    ("sell the family farm", "sold the family farm", "cows"),
    ("repair the lighthouse", "repaired the lighthouse", "lamps"),
    ("teach the evening class", "taught the evening class", "students"),
    ("organise the street festival", "organised the street festival", "concerts"),
    ("carve the wooden statue", "carved the wooden statue", "statues"),
    ("sail around the island", "sailed around the island", "islands"),
    ("photograph the eclipse", "photographed the eclipse", "photographs"),
    ("decode the secret letter", "decoded the secret letter", "letters"),
    ("breed the rare orchid", "bred the rare orchid", "orchids"),
    ("draft the new constitution", "drafted the new constitution", "articles"),
    ("excavate the roman villa", "excavated the roman villa", "coins"),
    ("knit the giant scarf", "knitted the giant scarf", "scarves"),
    ("fly the first glider", "flew the first glider", "flights"),
    ("brew the prize-winning beer", "brewed the prize-winning beer", "barrels"),
    ("sculpt the marble fountain", "sculpted the marble fountain", "fountains"),
    ("chart the coral reef", "charted the coral reef", "reefs"),
    ("stage the opera", "staged the opera", "operas"),
]
SUBJECTS = [
    "the mayor", "the young architect", "the author", "the old sailor", "the inventor",
    "the professor", "her grandfather", "the local baker", "the explorer", "the painter",
    "the engineer", "the composer", "the captain", "the journalist", "the gardener",
    "your neighbour", "the famous chemist", "the twins", "the governor", "the librarian",
]  # fmt: skip
PERSON_NOUNS = [
    "architect", "author", "painter", "engineer", "scientist", "sailor", "politician",
    "musician", "teacher", "nurse", "explorer", "merchant", "poet", "priest", "pilot",
    "carpenter", "actress", "lawyer", "monk", "farmer",
]  # fmt: skip
PLACE_NOUNS = [
    "city", "town", "village", "country", "island", "valley", "harbour town", "region",
    "province", "street", "district", "mountain village", "capital", "port", "county",
    "river town", "coastal city", "state", "neighbourhood", "desert town",
]  # fmt: skip
TIME_NOUNS = [
    "year", "decade", "century", "month", "season", "week", "winter", "summer", "spring",
    "era", "day", "autumn", "morning", "evening", "night", "weekend", "holiday",
    "period", "afternoon", "hour",
]  # fmt: skip
PLACES = [
    "Varnholm", "Lisbon", "Kestrel Bay", "Oslo", "Marrowdale", "Quito", "Port Ellis",
    "Krakow", "Dunmere", "Nairobi", "Sable Rock", "Lyon", "Tarnwick", "Hobart", "Elmsford",
]  # fmt: skip
TIMES = [
    "in 1987", "in 1962", "in the spring of 1974", "during the war", "in the late sixties",
    "last winter", "in 2003", "after the flood", "in the summer of 1955", "before the election",
]  # fmt: skip
NUMBERS = [
    "three", "twelve", "forty", "two hundred", "seven", "nineteen", "sixty", "thirty",
    "five", "eighty",
]  # fmt: skip

# Distractor modifiers, by the answer type they mention (never the question's own focus).
DISTRACT = {
    "person": [
        "with the help of the architect who grew up there",
        "together with the poet who lived next door",
        "for the widow who had asked for it",
        "with a friend whose brother was a pilot",
        "after the teacher who trained them retired",
    ],
    "location": [
        "in the town where the river bends",
        "near the square where the market is held",
        "far from {place}",
        "on the island where they had met",
        "in {place}",
    ],
    "time": [
        "when the war was over",
        "{time}",
        "at the moment when the lights went out",
        "on the day the king died",
        "just after the storm had passed",
    ],
    "number": [
        "with {num} volunteers",
        "after {num} failed attempts",
        "for {num} dollars",
        "in front of {num} people",
        "for the {num} children of the village",
    ],
}
FRONTED = {
    "person": [
        "According to the man who told me the story, ",
        "As the mayor who hired them says, ",
    ],
    "location": ["In the city where she was born, ", "Back in {place}, "],
    "time": ["When the school closed, ", "Long after the war, "],
    "number": ["Out of {num} candidates, ", "Of all {num} entries, "],
}

# Frames: {subj} subject, {vb} base event, {vp} past event, {obj} plural object,
# {pn}/{ln}/{tn} person / place / time focus nouns, {m} distractor modifiers.
FRAMES = {
    "person": [
        "who {vp}{m}?",
        "which {pn} {vp}{m}?",
        "tell me the name of the {pn} who {vp}{m}.",
        "I wonder who {vp}{m}.",
        "do you know which {pn} {vp}{m}?",
        "who was the {pn} that {vp}{m}?",
        "whose idea was it to {vb}{m}?",
    ],
    "location": [
        "where did {subj} {vb}{m}?",
        "in which {ln} did {subj} {vb}{m}?",
        "tell me the {ln} where {subj} {vp}{m}.",
        "I wonder where {subj} {vp}{m}.",
        "do you know in what {ln} {subj} {vp}{m}?",
        "which {ln} was it that {subj} {vp} in{m}?",
        "from where did {subj} {vb}{m}?",
    ],
    "time": [
        "when did {subj} {vb}{m}?",
        "in which {tn} did {subj} {vb}{m}?",
        "tell me the {tn} when {subj} {vp}{m}.",
        "I wonder when {subj} {vp}{m}.",
        "do you know in what {tn} {subj} {vp}{m}?",
        "what {tn} was it that {subj} {vp}{m}?",
        "how long ago did {subj} {vb}{m}?",
    ],
    "number": [
        "how many {obj} did {subj} need to {vb}{m}?",
        "what number of {obj} did {subj} use to {vb}{m}?",
        "tell me how many {obj} were used when {subj} {vp}{m}.",
        "I wonder how many people watched as {subj} {vp}{m}.",
        "do you know the number of {obj} involved when {subj} {vp}{m}?",
        "how much did it cost to {vb}{m}?",
        "how many times did {subj} try to {vb}{m}?",
    ],
}
# Paraphrase frames used only in validation and test.
HELDOUT = {
    "person": ["can you name the {pn} who {vp}{m}?", "I'd like to know who {vp}{m}."],
    "location": ["at which {ln} did {subj} {vb}{m}?", "I'd like to know where {subj} {vp}{m}."],
    "time": ["at what {tn} did {subj} {vb}{m}?"],
    "number": ["what was the total number of {obj} needed to {vb}{m}?"],
}


# Indirect questions, embedded in a wrapper request: the answer type is the embedded question's.
INDIRECT = {
    "person": ["who {vp}{m}", "which {pn} {vp}{m}", "the name of the {pn} who {vp}{m}"],
    "location": [
        "where {subj} {vp}{m}",
        "in which {ln} {subj} {vp}{m}",
        "the {ln} where {subj} {vp}{m}",
    ],
    "time": ["when {subj} {vp}{m}", "in which {tn} {subj} {vp}{m}", "the {tn} when {subj} {vp}{m}"],
    "number": [
        "how many {obj} {subj} needed to {vb}{m}",
        "the number of {obj} that {subj} used to {vb}{m}",
        "how much it cost to {vb}{m}",
        "how many times {subj} tried to {vb}{m}",
    ],
}
# Wrappers, drawn independently of the label: their own wh-words ("who can tell me ...") say
# nothing about the answer type, which is the embedded question's.
WRAPPERS = [
    "who can tell me {q}?",
    "who remembers {q}?",
    "where can I find out {q}?",
    "where would I look up {q}?",
    "when will we find out {q}?",
    "when did you learn {q}?",
    "how many people know {q}?",
    "how many of you remember {q}?",
    "tell me {q}.",
    "I wonder {q}.",
    "do you know {q}?",
    "can you find out {q}?",
]
HELDOUT_WRAPPERS = [
    "who knows {q}?",
    "where could we learn {q}?",
    "when can you tell us {q}?",
    "how many of them know {q}?",
    "please check {q}.",
]
P_WRAPPED = 0.6


def _partition(rng, items):
    items = list(items)
    rng.shuffle(items)
    n = len(items)
    a = round(n * PART["train"])
    b = a + round(n * PART["validation"])
    return {"train": items[:a], "validation": items[a:b], "test": items[b:]}


class Builder:
    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.events = _partition(self.rng, EVENTS)
        self.nouns = {
            "pn": _partition(self.rng, PERSON_NOUNS),
            "ln": _partition(self.rng, PLACE_NOUNS),
            "tn": _partition(self.rng, TIME_NOUNS),
        }

    def _fill(self, text):
        r = self.rng
        return (
            text.replace("{place}", r.choice(PLACES))
            .replace("{time}", r.choice(TIMES))
            .replace("{num}", r.choice(NUMBERS))
        )

    def _mods(self, label):
        """One or two distractor modifiers, of answer types other than ``label``."""
        r = self.rng
        others = [t for t in LABELS if t != label]
        kinds = r.sample(others, r.choice([1, 1, 2]))
        return "".join(" " + self._fill(r.choice(DISTRACT[k])) for k in kinds)

    def example(self, split, label):
        r = self.rng
        if r.random() < P_WRAPPED:
            wrappers = WRAPPERS + (HELDOUT_WRAPPERS if split != "train" else [])
            frame = r.choice(wrappers).replace("{q}", r.choice(INDIRECT[label]))
        else:
            frame = r.choice(FRAMES[label] + (HELDOUT[label] * 2 if split != "train" else []))
        vb, vp, obj = r.choice(self.events[split])
        text = frame.format(
            subj=r.choice(SUBJECTS),
            vb=vb,
            vp=vp,
            obj=obj,
            pn=r.choice(self.nouns["pn"][split]),
            ln=r.choice(self.nouns["ln"][split]),
            tn=r.choice(self.nouns["tn"][split]),
            m=self._mods(label) if r.random() < 0.85 else "",
        )
        if r.random() < 0.3:
            front = self._fill(r.choice(FRONTED[r.choice([t for t in LABELS if t != label])]))
            text = front + text
        return text[0].upper() + text[1:]

    def build(self):
        out, seen = {}, set()
        for split, size in SIZES.items():
            rows = []
            per = size // len(LABELS)
            for y, label in enumerate(LABELS):
                made = 0
                while made < per:
                    text = self.example(split, label)
                    if text.lower() in seen:
                        continue
                    seen.add(text.lower())
                    rows.append({"text": text, "label": y})
                    made += 1
            self.rng.shuffle(rows)
            out[split] = rows
        return out


def verify(splits):
    """Labels balanced; no text in two splits; held-out event phrases never in train."""
    texts = {s: {r["text"] for r in rows} for s, rows in splits.items()}
    assert not texts["train"] & (texts["validation"] | texts["test"])
    for s, rows in splits.items():
        c = Counter(r["label"] for r in rows)
        assert len(set(c.values())) == 1 and len(c) == len(LABELS), (s, c)
    train_events = {vp for vb, vp, _ in Builder(SEED).events["train"]}
    for s in ("validation", "test"):
        for r in splits[s]:
            assert not any(vp in r["text"] for vp in train_events), r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / NAME)
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    splits = Builder(args.seed).build()
    if args.seed == SEED:
        verify(splits)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(args.out / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    (args.out / "labels.json").write_text(json.dumps(LABELS) + "\n", encoding="utf-8")
    for split, rows in splits.items():
        c = Counter(r["label"] for r in rows)
        print(f"{split}: {len(rows)} examples, labels {dict(sorted(c.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
