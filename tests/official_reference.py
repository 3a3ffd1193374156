"""A faithful re-implementation of how the official scripts (Peter-Fy/Reason4Rec) build their prompts: for every
row, a scan of the whole history frame, then the prompt text as the official f-strings write it.  The oracle that
the project's prompts and history index are tested against, and the "official" side of benchmarks/history_prompts.py.

Two deliberate departures, both documented in the README: the official code sorts with pandas' default (unstable)
sort, so the order of reviews sharing a timestamp is unspecified there; here the sort is stable (file order).  And
where a user or item has no earlier review, the official prompts print "nan"; the project prints "N/A", so the
oracle is only asked about rows with both histories.
"""
import pandas as pd


def official_histories(history_df: pd.DataFrame, row, summary_column="aspect_preference_summary"):
    user_history = history_df[history_df["user_id"] == row.user_id]
    user_history = user_history[user_history["unixReviewTime"] < row.unixReviewTime]
    user_history = user_history.sort_values(by="unixReviewTime", ascending=True, kind="stable")
    user_average_rating = user_history["ratings"].mean()
    user_history = user_history.tail(10)

    item_history = history_df[history_df["item_id"] == row.item_id]
    item_history = item_history[item_history["unixReviewTime"] < row.unixReviewTime]
    item_history = item_history.sort_values(by="unixReviewTime", ascending=True, kind="stable")
    item_average_rating = item_history["ratings"].mean()
    item_history = item_history.tail(10)
    return user_history, item_history, user_average_rating, item_average_rating


def _text(history, with_ratings, summary_column="aspect_preference_summary"):
    text = ""
    for i, (_, his) in enumerate(history.iterrows()):
        if with_ratings:
            text += f"{i + 1}. {his['title']}, {float(his['ratings']):.1f};\n"
        else:
            text += f"{i + 1}. {his['title']}\n"
        text += f"{his[summary_column]}".strip() + "\n\n"
    return text.strip()


def official_reason_prompt(product_class, row, history_df, hint=None, histories=None):
    user_history, item_history, _, _ = histories or official_histories(history_df, row)
    user_history_text, item_history_text = _text(user_history, False), _text(item_history, False)
    target_title = row.title
    question = f"""Here is information about a user and a new {product_class} "{target_title}" being recommended to the user. For the user, we have the user's review history. For the new item being recommended, we have the item review history by other users.

### User Review History ###
{user_history_text}

### Item Review History by other users ###
{item_history_text}

Analyze whether the user will like the new {product_class} "{target_title}" based on the user's preferences and the recommended item's features. Give you rationale in one paragraph."""
    if hint is None:
        return question
    target_rating = hint
    return f"""Here is information about a user and a new {product_class} "{target_title}" being recommended to the user. For the user, we have the user's review history. For the new item being recommended, we have the item review history by other users.

### User Review History ###
{user_history_text}

### Item Review History by other users ###
{item_history_text}

Analyze whether the user will like the new {product_class} "{target_title}" based on the user's preferences and the recommended item's features. Give you rationale in one paragraph. 
(Hint: The user actually rated the item {target_rating} stars. The star range is from 1 to 5, with 5 being the best. Use the hint but don't mention user's rating in your response.)"""  # noqa: W291


def official_predictor_prompts(product_class, row, history_df, analysis):
    """As 3_Predictor/1 does: one scan, then the Reasoner's prompt and the Predictor's prompt."""
    histories = official_histories(history_df, row)
    return official_reason_prompt(product_class, row, history_df, histories=histories), \
        official_rating_prompt(product_class, row, history_df, analysis, histories=histories)


def official_rating_prompt(product_class, row, history_df, analysis=None, histories=None):
    user_history, item_history, user_average_rating, item_average_rating = \
        histories or official_histories(history_df, row)
    user_history_text, item_history_text = _text(user_history, True), _text(item_history, True)
    target_title = row.title
    if analysis is None:
        return f"""Here is information about a user and a new {product_class} "{target_title}" being recommended to the user. For the user, we have the user's past rating history User ratings range from 1 to 5, where 1 is the lowest and 5 is the highest. For the new item being recommended, we have the item rating history by other users.

### User Rating History ###
{user_history_text}

### Item Rating History by other users ###
{item_history_text}

### Average Past Ratings ###
User's Average Rating (all previous ratings): {float(user_average_rating):.1f}
Item's Average Rating (all ratings by other users): {float(item_average_rating):.1f}

Based on the user's and item's rating histories and their average past ratings, please predict the user's rating for "{target_title}", (1 being the lowest and 5 being highest, directly give the rating without other content.)
[Output Format] Predicted Rating: [A rating between 1 and 5]\tGive your reply following the output format without any extra information."""
    return f"""Here is information about a user and a new {product_class} "{target_title}" being recommended to the user. For the user, we have the user's past rating history User ratings range from 1 to 5, where 1 is the lowest and 5 is the highest. For the new item being recommended, we have the item rating history by other users.

### User Rating History ###
{user_history_text}

### Item Rating History by other users ###
{item_history_text}

### Average Past Ratings ###
User's Average Rating (all previous ratings): {float(user_average_rating):.1f}
Item's Average Rating (all ratings by other users): {float(item_average_rating):.1f}

### Personalized Recommendation Analysis ###
{analysis}

Based on the above information, please predict the user's rating for "{target_title}", (1 being the lowest and 5 being highest, directly give the rating without other content.)
[Output Format] Predicted Rating: [A rating between 1 and 5]\tGive your reply following the output format without any extra information."""


def official_direct_prediction_prompt(product_class, row, history_df):
    """The authors' direct-prediction ablation, a4fa718 step3_construct_direct_rating_train.ipynb (its f-string)."""
    user_history, item_history, user_average_rating, item_average_rating = official_histories(history_df, row)
    user_history_text, item_history_text = _text(user_history, True), _text(item_history, True)
    target_title = row.title
    prompt = f"""Here is information about a user and a new {product_class} "{target_title}" being recommended to the user. For the user, we have the user's past rating history User ratings range from 1 to 5, where 1 is the lowest and 5 is the highest. For the new item being recommended, we have the item rating history by other users.

### User Rating History ###
{user_history_text}

### Item Rating History by other users ###
{item_history_text}

### Average Past Ratings ###
User's Average Rating (all previous ratings): {float(user_average_rating):.1f}
Item's Average Rating (all ratings by other users): {float(item_average_rating):.1f}

Based on the above information, please predict the user's rating for "{target_title}", (1 being the lowest and 5 being highest, directly give the rating without other content.)
[Output Format] Predicted Rating: [A rating between 1 and 5]\tGive your reply following the output format without any extra information."""
    return prompt


OFFICIAL_SUMMARY_EXAMPLE = """Task: Summarize the reasons behind the given rating of a Musical Instruments based on the customer review.
Musical Instruments: Snark SN-5 Tuner
Rating: 4.0
Review: Clips on well, reads fast, a bit dim in sunlight.

Analyze the above customer review for the Musical Instruments 'Snark SN-5 Tuner' and summarize the reasons behind the given rating of 4.0. Please consider the positive and negative aspects mentioned in the review and provide the keywords of reasons and user preference elements.

[Example]
Product: Wireless Bluetooth Headphones
Review: I absolutely love these wireless Bluetooth headphones. They are incredibly lightweight and comfortable to wear, with a long battery life. The sound quality is clear, with deep bass and crisp highs. However, the charging case is prone to scratches, and sometimes the connection is unstable. Overall, I'm very satisfied; they are worth the price.
Output:
Positive Aspects: Comfortable, Lightweight, Long Battery Life, Clear Sound, Deep Bass, Crisp Highs
Negative Aspects: Scratch-Prone Case, Unstable Connection
User Preference Elements: Durability, Aesthetic Appeal, Reliability, Value for Money

Give your reply following the example output format. Directly give Positive Aspects, Negative Aspects, and User Preference Elements without other content.
"""
