"""The five prompt kinds of Reason4Rec, word for word from the official code (Peter-Fy/Reason4Rec).

1. summary_prompt       - a review -> "Positive Aspects / Negative Aspects / User Preference Elements"
2. reason_prompt        - histories without ratings -> a reason ("Give you rationale in one paragraph." sic)
3. rating_prompt        - histories with ratings and averages -> "Predicted Rating: x"
4. rating_prompt(analysis=...) - as 3, with a "### Personalized Recommendation Analysis ###" block
5. reason_prompt(hint=...)     - as 2, with the true rating as a hint

and the answer format that the reward model and the Predictor learn ("Predicted Rating: x.0").

One deliberate change: where a user or item has no earlier review, the official prompts show "nan" averages
and an empty history; here they show "N/A" (see README, differences).

Two more, this project's own, judge the reasons (3_Predictor/5_evaluate_reasons.py); the paper scores reasons with
GPTScore but does not publish its template, and has no LLM judge:

6. gptscore_prompt  - a fixed instruction and a reason: the user turn whose answer, the real review, GPTScore scores;
   gptscore_reverse_prompt, the other direction: the instruction reversed and the real review, answered by the reason
7. judge_prompt     - a rubric, the real review and a reason -> "Score: N" (1-10), read by judge_score

The settings that shape prompts (the product class, the history length) are recorded with the data on first use
(utils.recorded), so that no step can build its prompts differently from the others.
"""
import re
from dataclasses import dataclass

from histories import History, Review
from settings import recorded

MISSING = "N/A"
RATING_PREFIX = "Predicted Rating: "

# The product class of the authors' published datasets, which come without a dataset.json.
AUTHORS_PRODUCT_CLASSES = {"Music_data": "Digital Music", "Book_data": "Book", "Yelp_data": "Yelp Business"}


@dataclass
class PromptArguments:
    product_class: str | None = recorded(
        lambda data: AUTHORS_PRODUCT_CLASSES.get(data.dataset),
        help="what the items are, as the prompts name them (Data/prepare_data.py records it; the authors' Music_data, "
             "Book_data and Yelp_data are known)")


@dataclass
class HistoryPromptArguments(PromptArguments):
    max_his: int | None = recorded(
        10, help="reviews shown per user / item history (Data/prepare_data.py records it; else 10, as the paper)")
    drop_leaked_history_rows: bool | None = recorded(
        False, help="leave out of the histories the training rows that are also in the valid or test split (the "
                    "authors' published splits share a few)")


@dataclass
class TestPromptArguments(HistoryPromptArguments):
    test_history_before_target: bool | None = recorded(
        True, help="test-time histories and averages only from reviews before the target's time (official HEAD); "
                   "false: from all training reviews, as the authors' original code (a4fa718)")


def to_messages(question: str, answer: str) -> dict:
    """One SFT example in the official format."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def rating_answer(rating) -> str:
    """What the reward model and the Predictor learn to answer: "Predicted Rating: 4.0"."""
    return f"{RATING_PREFIX}{float(rating):.1f}"

# Official text; the @@@...### placeholders are filled with str.replace, as the official code does, so that braces
# in a review cannot break the template.
SUMMARY_TEMPLATE = """Task: Summarize the reasons behind the given rating of a @@@class### based on the customer review.
@@@class###: @@@title###
Rating: @@@rating###
Review: @@@review###

Analyze the above customer review for the @@@class### '@@@title###' and summarize the reasons behind the given rating of @@@rating###. Please consider the positive and negative aspects mentioned in the review and provide the keywords of reasons and user preference elements.

[Example]
Product: Wireless Bluetooth Headphones
Review: I absolutely love these wireless Bluetooth headphones. They are incredibly lightweight and comfortable to wear, with a long battery life. The sound quality is clear, with deep bass and crisp highs. However, the charging case is prone to scratches, and sometimes the connection is unstable. Overall, I'm very satisfied; they are worth the price.
Output:
Positive Aspects: Comfortable, Lightweight, Long Battery Life, Clear Sound, Deep Bass, Crisp Highs
Negative Aspects: Scratch-Prone Case, Unstable Connection
User Preference Elements: Durability, Aesthetic Appeal, Reliability, Value for Money

Give your reply following the example output format. Directly give Positive Aspects, Negative Aspects, and User Preference Elements without other content.
"""

def summary_prompt(product_class: str, title: str, rating, review: str) -> str:
    prompt = SUMMARY_TEMPLATE.replace("@@@class###", product_class)
    prompt = prompt.replace("@@@title###", str(title))
    prompt = prompt.replace("@@@review###", str(review))
    return prompt.replace("@@@rating###", str(rating))


def history_text(reviews: list[Review], with_ratings: bool) -> str:
    text = ""
    for i, review in enumerate(reviews):
        text += f"{i + 1}. {review.title}, {float(review.rating):.1f};\n" if with_ratings else f"{i + 1}. {review.title}\n"
        text += review.summary.strip() + "\n\n"
    return text.strip() or MISSING


def _average(value) -> str:
    return MISSING if value is None else f"{float(value):.1f}"


def reason_prompt(product_class: str, title: str, history: History, hint=None) -> str:
    """Prompt 2 (what the teacher and the Reasoner answer); with `hint` (the true rating), prompt 5."""
    prompt = f"""Here is information about a user and a new {product_class} "{title}" being recommended to the user. For the user, we have the user's review history. For the new item being recommended, we have the item review history by other users.

### User Review History ###
{history_text(history.user, with_ratings=False)}

### Item Review History by other users ###
{history_text(history.item, with_ratings=False)}

Analyze whether the user will like the new {product_class} "{title}" based on the user's preferences and the recommended item's features. Give you rationale in one paragraph."""
    if hint is not None:
        prompt += (" \n"  # sic: a space before the line break
                   f"(Hint: The user actually rated the item {hint} stars. The star range is from 1 to 5, with 5 being "
                   "the best. Use the hint but don't mention user's rating in your response.)")
    return prompt


def _rating_context(product_class: str, title: str, history: History) -> str:
    return f"""Here is information about a user and a new {product_class} "{title}" being recommended to the user. For the user, we have the user's past rating history User ratings range from 1 to 5, where 1 is the lowest and 5 is the highest. For the new item being recommended, we have the item rating history by other users.

### User Rating History ###
{history_text(history.user, with_ratings=True)}

### Item Rating History by other users ###
{history_text(history.item, with_ratings=True)}

### Average Past Ratings ###
User's Average Rating (all previous ratings): {_average(history.user_avg)}
Item's Average Rating (all ratings by other users): {_average(history.item_avg)}

"""


_RATING_OUTPUT = """(1 being the lowest and 5 being highest, directly give the rating without other content.)
[Output Format] Predicted Rating: [A rating between 1 and 5]\tGive your reply following the output format without any extra information."""


def rating_prompt(product_class: str, title: str, history: History, analysis: str | None = None) -> str:
    """Prompt 3 (direct rating: the reward model without a reason); with `analysis` (a review, a candidate reason or
    the Reasoner's reply), prompt 4 (the reward model with one, and the Predictor)."""
    context = _rating_context(product_class, title, history)
    if analysis is None:
        return context + f"""Based on the user's and item's rating histories and their average past ratings, please predict the user's rating for "{title}", """ + _RATING_OUTPUT
    return context + f"""### Personalized Recommendation Analysis ###
{analysis}

Based on the above information, please predict the user's rating for "{title}", """ + _RATING_OUTPUT


def direct_prediction_prompt(product_class: str, title: str, history: History) -> str:
    """The authors' direct-prediction ablation (a4fa718, step3_construct_direct_rating_train.ipynb): prompt 4 without
    its analysis block, ending with its own "Based on the above information" (not prompt 3's closing sentence)."""
    return _rating_context(product_class, title, history) + \
        f"""Based on the above information, please predict the user's rating for "{title}", """ + _RATING_OUTPUT


def predictor_prompts(product_class: str, titles, histories, analyses=None) -> list[str]:
    """The Predictor's prompts, the same in training (3_Predictor/1) and at test (3_Predictor/3): prompt 4 with the
    Reasoner's `analyses`; without them (None), the direct-prediction ablation's."""
    if analyses is None:
        return [direct_prediction_prompt(product_class, t, h) for t, h in zip(titles, histories)]
    return [rating_prompt(product_class, t, h, a) for t, h, a in zip(titles, histories, analyses)]


# ---------------------------------------------------------------------------------------------- judging the reasons
# This project's own texts (not the paper's): what a reason is judged by against the review the user then wrote.
GPTSCORE_INSTRUCTION = ("Here is an analysis of whether a user will enjoy an item. "
                        "Write the review this user wrote for it.")


GPTSCORE_REVERSE_INSTRUCTION = ("Here is the review a user wrote of an item. "
                                "Write an analysis of whether this user will enjoy the item.")


def gptscore_prompt(analysis: str) -> str:
    """The user turn to which GPTScore takes the real review as the answer (llm.Expert.loglikelihood)."""
    return f"{GPTSCORE_INSTRUCTION}\n\n### Analysis ###\n{analysis}"


def gptscore_reverse_prompt(review: str) -> str:
    """The user turn to which GPTScore's other direction takes the reason as the answer."""
    return f"{GPTSCORE_REVERSE_INSTRUCTION}\n\n### Review ###\n{review}"


JUDGE_TEMPLATE = """You are grading an analysis that was written, before a user reviewed an item, to anticipate whether the user would enjoy it. Compare it with the review the user actually wrote.

### The user's real review ###
@@@review###

### The analysis ###
@@@analysis###

Rubric: does the analysis anticipate the user's stated likes and dislikes?
10-9: it anticipates the main things the user liked and disliked, and the user's overall verdict.
8-6: it anticipates the overall verdict and some of the stated likes or dislikes.
5-3: it is generic, or reaches the right verdict for reasons the user does not give.
2-1: it contradicts the review, misses everything the user said, or is empty.
Judge what the analysis anticipates, not its style or length.

Answer with "Score: N" (N an integer from 1 to 10) on the first line, then one sentence saying why."""


def judge_prompt(review: str, analysis: str) -> str:
    # filled with str.replace, like the official templates, so that braces in a text cannot break it
    return JUDGE_TEMPLATE.replace("@@@review###", str(review)).replace("@@@analysis###", str(analysis))


def judge_score(answer: str) -> float | None:
    """The judge's score (1-10) from its answer ("Score: 7", "score = 7/10", "**Score:** 7"); None if it gives none."""
    found = re.search(r"score\W{0,4}(\d+(?:\.\d+)?)", str(answer), flags=re.IGNORECASE)
    return float(found.group(1)) if found and 1 <= float(found.group(1)) <= 10 else None

