"""A seeded generator of short movie-review-like texts: the testbed's pre-training corpus.

The reviews are built from sentence templates over a small vocabulary of film topics and
positive, negative and neutral words. Several constructions make the sentiment of a review
depend on word order and not only on which words occur (so a bag of words cannot read it off):
negation ("the plot was not bad", "I would never recommend it"), intensifiers and dampeners
("extremely dull", "barely funny"), contrast ("the acting was weak, but the story was
wonderful"; "although ..., ..."), idioms whose polarity is the reverse of their words ("could
have been better", "far from perfect", "never gets boring"). Each review has a latent polarity
that keeps its sentences mostly consistent, the way a real review argues for one verdict.

Everything is drawn from one ``random.Random(seed)``, so the corpus is a pure function of
``(n, seed)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# -- vocabulary --------------------------------------------------------------------------------

# (noun phrase, is_plural): agreement of "was"/"were" keeps the texts grammatical.
TOPICS: tuple[tuple[str, bool], ...] = (
    ("acting", False), ("plot", False), ("score", False), ("soundtrack", False),
    ("pacing", False), ("dialogue", False), ("script", False), ("ending", False),
    ("cinematography", False), ("direction", False), ("cast", False), ("story", False),
    ("humor", False), ("editing", False), ("lead actor", False), ("villain", False),
    ("camera work", False), ("opening scene", False), ("music", False), ("final act", False),
    ("screenplay", False), ("lighting", False), ("premise", False), ("climax", False),
    ("first half", False), ("second half", False), ("romance", False), ("writing", False),
    ("main character", False), ("set design", False), ("tone", False), ("sound design", False),
    ("visual effects", True), ("characters", True), ("performances", True), ("twists", True),
    ("costumes", True), ("action scenes", True), ("jokes", True), ("fight scenes", True),
    ("supporting roles", True), ("songs", True), ("flashbacks", True), ("battle scenes", True),
)

FILMS: tuple[str, ...] = (
    "movie", "film", "picture", "sequel", "drama", "comedy", "thriller", "remake",
    "documentary", "western", "musical", "horror movie", "war film", "love story", "cartoon",
    "mystery", "biopic", "crime drama", "spy movie", "adventure",
)

POSITIVE: tuple[str, ...] = (
    "good", "great", "wonderful", "excellent", "brilliant", "superb", "beautiful", "charming",
    "fun", "funny", "moving", "clever", "solid", "impressive", "delightful", "gripping",
    "fantastic", "lovely", "enjoyable", "smart", "strong", "fresh", "powerful", "stunning",
    "perfect", "memorable", "touching", "engaging", "thrilling", "amazing", "elegant", "sweet",
)

NEGATIVE: tuple[str, ...] = (
    "bad", "terrible", "awful", "boring", "dull", "weak", "poor", "messy", "lazy", "stupid",
    "horrible", "painful", "bland", "flat", "clumsy", "disappointing", "forgettable",
    "annoying", "ugly", "tedious", "silly", "pointless", "confusing", "awkward", "lifeless",
    "dreadful", "weird", "sloppy", "cheap", "tiresome", "ridiculous", "shallow",
)

NEUTRAL: tuple[str, ...] = (
    "long", "short", "simple", "loud", "quiet", "slow", "fast", "dark", "colorful",
    "old-fashioned", "familiar", "unusual", "ordinary", "typical", "straightforward", "modern",
    "busy", "understated", "traditional", "low-key",
)

# Intensifiers raise, dampeners ("barely", "slightly") lower the strength of what follows.
INTENSIFIERS: tuple[str, ...] = (
    "very", "really", "extremely", "incredibly", "truly", "quite", "so", "pretty", "fairly",
    "absolutely", "deeply", "remarkably", "genuinely", "rather",
)
DAMPENERS: tuple[str, ...] = ("barely", "slightly", "somewhat", "a bit", "only mildly", "hardly")

OPENERS: tuple[str, ...] = (
    "Honestly,", "To be fair,", "In my opinion,", "Overall,", "For the most part,", "Frankly,",
    "At times", "Surprisingly,", "As expected,", "Once again", "From start to finish", "Sadly,",
    "Thankfully,", "In the end", "On the whole,", "To my surprise,", "Of course", "I thought",
    "I felt that", "My friends agreed that", "Most critics say", "I have to say",
)

WATCHERS: tuple[str, ...] = (
    "My wife and I", "My kids", "My brother and I", "We", "My friends and I", "The whole family",
    "My parents", "My girlfriend and I", "Our group", "My roommate and I", "My dad",
)

SETTINGS: tuple[str, ...] = (
    "in a small town", "in Paris", "in the near future", "in the nineteen twenties", "at sea",
    "in a big city", "during the war", "on a farm", "in a haunted house", "in space",
    "in a high school", "in the desert", "in London", "in a quiet village", "on a train",
)

PROTAGONISTS: tuple[str, ...] = (
    "a young nurse", "two brothers", "a retired detective", "a lonely painter", "three friends",
    "a single mother", "an old soldier", "a shy student", "a famous chef", "a stubborn farmer",
    "a young couple", "a street musician", "a small-town sheriff", "a pair of thieves",
)

OCCASIONS: tuple[str, ...] = (
    "on a Sunday", "last night", "with my family", "at the theater", "on a long flight",
    "at home", "on a rainy afternoon", "last weekend", "at a festival", "on television",
)

RUNTIMES: tuple[str, ...] = (
    "about two hours", "ninety minutes", "almost three hours", "just over an hour",
    "a little under two hours",
)

# Verbs of liking, by polarity, as (past tense, "I did not ..." base form).
LIKE_VERBS: dict[int, tuple[tuple[str, str], ...]] = {
    1: (("loved", "love"), ("liked", "like"), ("enjoyed", "enjoy"), ("adored", "adore"),
        ("admired", "admire"), ("appreciated", "appreciate")),
    -1: (("hated", "hate"), ("disliked", "dislike"), ("could not stand", "mind"),
         ("regretted", "regret"), ("resented", "resent")),
}

# Idioms with a polarity that differs from (or is absent in) their words.
IDIOMS: dict[int, tuple[str, ...]] = {
    1: ("It never gets boring.", "It never lets up.", "It is not a waste of time at all.",
        "I could not look away.", "There is not a single dull moment.",
        "Nothing about it felt cheap.", "I was never bored.", "It does not disappoint.",
        "I would watch it again tomorrow.", "It stayed with me for days."),
    -1: ("It never comes together.", "It never finds its footing.", "It could have been better.",
         "It is far from perfect.", "I was checking my watch the whole time.",
         "It never makes sense.", "I wanted my money back.", "I almost fell asleep.",
         "Nothing in it feels real.", "It is not worth your time."),
}

VERDICTS: dict[int, tuple[str, ...]] = {
    1: ("I would definitely recommend it.", "I would happily recommend it to anyone.",
        "Go see it.", "Highly recommended.", "Worth every minute.", "A must see.",
        "I will be thinking about it for a while.", "Do not miss it."),
    -1: ("I would never recommend it.", "I would not recommend it to anyone.", "Skip it.",
         "Avoid this one.", "Not worth the ticket.", "What a waste of a good cast.",
         "Save your money.", "I do not see the point."),
}


class _Writer:
    """Draws the sentences of one review from a shared random stream."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    # -- small draws -------------------------------------------------------------------------

    def pick(self, seq: tuple[str, ...] | list[str]) -> str:
        return seq[self.rng.randrange(len(seq))]

    def topic(self) -> tuple[str, str]:
        """A topic noun phrase and its agreeing form of 'to be' (past tense)."""
        name, plural = TOPICS[self.rng.randrange(len(TOPICS))]
        return name, ("were" if plural else "was")

    def adjective(self, polarity: int) -> str:
        """An adjective of that polarity (+1, -1, 0), sometimes with an intensifier or dampener."""
        pool = POSITIVE if polarity > 0 else NEGATIVE if polarity < 0 else NEUTRAL
        adj = self.pick(pool)
        r = self.rng.random()
        if polarity != 0 and r < 0.35:
            return f"{self.pick(INTENSIFIERS)} {adj}"
        if polarity != 0 and r < 0.45:
            return f"{self.pick(DAMPENERS)} {adj}"
        return adj

    def negated(self, polarity: int) -> str:
        """A phrase of the given polarity made by negating an adjective of the opposite one."""
        adj = self.pick(NEGATIVE if polarity > 0 else POSITIVE)
        form = self.rng.random()
        if form < 0.5:
            return f"not {adj}"
        if form < 0.75:
            return f"not at all {adj}"
        return f"never {adj}"

    # -- sentences of a given polarity ---------------------------------------------------------

    def plain(self, polarity: int) -> str:
        t, be = self.topic()
        return f"The {t} {be} {self.adjective(polarity)}."

    def with_opener(self, polarity: int) -> str:
        t, be = self.topic()
        opener = self.pick(OPENERS)
        return f"{opener} the {t} {be} {self.adjective(polarity)}."

    def negation(self, polarity: int) -> str:
        t, be = self.topic()
        return f"The {t} {be} {self.negated(polarity)}."

    def like(self, polarity: int) -> str:
        t, _ = self.topic()
        if self.rng.random() < 0.3:
            # "I did not like the plot" is negative although "like" is positive.
            base = self.pick([b for _, b in LIKE_VERBS[-polarity]])
            return f"I did not {base} the {t}."
        past = self.pick([p for p, _ in LIKE_VERBS[polarity]])
        who = self.pick(WATCHERS) if self.rng.random() < 0.3 else "I"
        return f"{who} {past} the {t}."

    def contrast(self, polarity: int) -> str:
        """Two clauses of opposite polarity where the second one carries the verdict."""
        (t1, be1), (t2, be2) = self.topic(), self.topic()
        first, second = self.adjective(-polarity), self.adjective(polarity)
        if self.rng.random() < 0.55:
            link = self.pick(("but", "but", "yet", "but honestly"))
            return f"The {t1} {be1} {first}, {link} the {t2} {be2} {second}."
        lead = self.pick(("Although", "Even though", "While"))
        return f"{lead} the {t1} {be1} {first}, the {t2} {be2} {second}."

    def film(self, polarity: int) -> str:
        film = self.pick(FILMS)
        shape = self.rng.random()
        if shape < 0.35:
            return f"This {film} is {self.adjective(polarity)}."
        if shape < 0.55:
            return f"What a {self.pick(POSITIVE if polarity > 0 else NEGATIVE)} {film}!"
        if shape < 0.8:
            return f"Overall, a {self.pick(POSITIVE if polarity > 0 else NEGATIVE)} {film}."
        return f"It is a {self.adjective(polarity)} {film} with a {self.adjective(polarity)} {self.topic()[0]}."

    def pair(self, polarity: int) -> str:
        t, be = self.topic()
        pool = POSITIVE if polarity > 0 else NEGATIVE
        return f"The {t} {be} {self.pick(pool)} and {self.pick(pool)}."

    def even(self, polarity: int) -> str:
        t, be = self.topic()
        return f"Even the {t} {be} {self.adjective(polarity)}."

    def neither(self, polarity: int) -> str:
        # "Neither X nor Y was dull" praises; it only exists for the positive side.
        (t1, _), (t2, _) = self.topic(), self.topic()
        if polarity > 0:
            return f"Neither the {t1} nor the {t2} was {self.pick(NEGATIVE)}."
        return f"Both the {t1} and the {t2} were {self.adjective(-1)}."

    def idiom(self, polarity: int) -> str:
        return self.pick(IDIOMS[polarity])

    def verdict(self, polarity: int) -> str:
        return self.pick(VERDICTS[polarity])

    # -- neutral sentences ---------------------------------------------------------------------

    def neutral(self) -> str:
        shape = self.rng.randrange(7)
        film = self.pick(FILMS)
        if shape == 0:
            return f"I watched it {self.pick(OCCASIONS)}."
        if shape == 1:
            return f"It runs {self.pick(RUNTIMES)}."
        if shape == 2:
            return f"The {film} is set {self.pick(SETTINGS)}."
        if shape == 3:
            return f"The story follows {self.pick(PROTAGONISTS)} {self.pick(SETTINGS)}."
        if shape == 4:
            t, be = self.topic()
            return f"The {t} {be} {self.adjective(0)}."
        if shape == 5:
            return f"{self.pick(WATCHERS)} saw this {film} {self.pick(OCCASIONS)}."
        return f"It is a {self.adjective(0)} {film} about {self.pick(PROTAGONISTS)}."


# Opinion sentence builders with their relative weights; the mix gives varied sentence shapes.
_OPINIONS: tuple[tuple[Callable[[_Writer, int], str], float], ...] = (
    (_Writer.plain, 3.0), (_Writer.with_opener, 2.0), (_Writer.negation, 1.5),
    (_Writer.like, 1.5), (_Writer.contrast, 2.0), (_Writer.film, 1.5), (_Writer.pair, 1.0),
    (_Writer.even, 0.6), (_Writer.neither, 0.6), (_Writer.idiom, 1.2),
)
_OPINION_FNS = [fn for fn, _ in _OPINIONS]
_OPINION_WEIGHTS = [w for _, w in _OPINIONS]

MIN_WORDS = 8
"""Shortest review in words; shorter drafts are redrawn."""
MAX_WORDS = 45
"""Longest review in words; longer drafts are redrawn."""


def _review(w: _Writer) -> str:
    """One review: an optional neutral setup, opinions of one latent polarity, an optional verdict."""
    rng = w.rng
    u = rng.random()
    # Latent verdict: mostly one-sided, a fifth mixed (one opposite sentence, then the verdict).
    polarity = 1 if u < 0.42 else -1 if u < 0.84 else rng.choice((1, -1))
    mixed = u >= 0.84
    n_opinions = rng.choices((1, 2, 3), weights=(0.45, 0.4, 0.15))[0]
    sentences: list[str] = []
    if rng.random() < 0.3:
        sentences.append(w.neutral())
    for i in range(n_opinions):
        # In a mixed review the first opinion argues the other side, later ones win out.
        pol = -polarity if (mixed and i == 0) else polarity
        fn = rng.choices(_OPINION_FNS, weights=_OPINION_WEIGHTS)[0]
        sentences.append(fn(w, pol))
    if rng.random() < 0.12:
        sentences.insert(rng.randrange(1, len(sentences) + 1), w.neutral())
    if rng.random() < 0.35:
        sentences.append(w.verdict(polarity))
    return " ".join(sentences[:4])


def generate_reviews(n: int, seed: int) -> list[str]:
    """`n` reviews of 1-4 sentences and 8-45 words, a pure function of `(n, seed)`.

    Drafts outside the word range are redrawn from the same stream, so the result stays
    deterministic.
    """
    if n < 0:
        raise ValueError(f"generate_reviews: n must be >= 0, got {n}")
    rng = random.Random(seed)
    writer = _Writer(rng)
    reviews: list[str] = []
    while len(reviews) < n:
        text = _review(writer)
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            reviews.append(text)
    return reviews
