"""The ground-truth reward of the shipped task: a word-count sentiment score for movie reviews.

The DPO paper's controlled-sentiment experiment scores IMDb continuations with a sentiment classifier
("Direct Preference Optimization: Your Language Model is Secretly a Reward Model", Rafailov et al., 2023,
arXiv:2305.18290, section 6.1). Here the classifier is replaced by a rule you can apply by hand:

    score = (number of positive words) - (number of negative words)

- The words are the two lists below; every other word ("very", "plot", "but", ...) counts zero.
- Negation: "not" or "never" flips the next sentiment word in the same clause, so "not good" is one negative
  word and "never boring" one positive word. A clause ends at . , ! ? or ; and a negator with no sentiment
  word before the clause ends does nothing.
- 0 means neutral or evenly balanced; each extra positive word adds 1. The score is a count, not a
  probability, so a review with four positive words beats one with two: there is always a more positive
  review to prefer, which is what the preference pairs rank.

Examples: "the acting was superb ." -> 1;  "the plot was not good ." -> -1;
"the music was great but the script was weak ." -> 0;  "i loved it . overall , a masterpiece ." -> 2.

Pure Python, no dependencies. The lists hold exactly the sentiment words of the shipped review language
(scripts/make_assets.py checks that), so the score is exact on that language and crude on other text.
"""

import re

POSITIVE_WORDS = frozenset("""
    good great excellent superb brilliant wonderful beautiful charming gripping moving clever funny
    delightful stunning fantastic memorable touching powerful impressive enjoyable lovely thrilling hilarious
    elegant inventive smart fresh solid
    loved enjoyed adored liked admired like enjoy love
    masterpiece triumph gem delight joy treat recommend
""".split())

NEGATIVE_WORDS = frozenset("""
    bad terrible awful dull boring weak clumsy flat forgettable tedious messy lifeless annoying
    predictable painful dreadful bland silly poor horrible lazy shallow stiff confusing cheap bloated hollow sloppy
    hated disliked loathed despised detested hate dislike
    disaster mess bore failure letdown chore
""".split())

NEGATORS = frozenset({"not", "never"})
CLAUSE_END = frozenset(".,!?;")


def sentiment_score(text: str) -> float:
    """#positive words - #negative words in `text`, where "not"/"never" flips the next sentiment word of its
    clause. Case-insensitive; punctuation may be attached ("great.") or spaced ("great .")."""
    score = 0
    negated = False
    for word in re.findall(r"[a-z]+|[^\sa-z]", text.lower()):
        if word in CLAUSE_END:
            negated = False
        elif word in NEGATORS:
            negated = True
        elif word in POSITIVE_WORDS or word in NEGATIVE_WORDS:
            polarity = 1 if word in POSITIVE_WORDS else -1
            score += -polarity if negated else polarity
            negated = False  # a negator flips one word
    return float(score)
