"""The rating baselines that LLM recommenders are compared with, all fitted on the training split only: the global,
user and item means, the user + item bias model, and the matrix factorisations SVD and SVD++ (scikit-surprise, the
field's own library, with fixed seeds)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from surprise import SVD, BaselineOnly, Dataset, Reader, SVDpp


def surprise_predictions(algorithm, train: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """Fit a scikit-surprise model on the training ratings and predict `rows` (clipped to [1, 5] by surprise; a user or
    item it has not seen contributes no term)."""
    data = Dataset.load_from_df(train[["user_id", "item_id", "ratings"]], Reader(rating_scale=(1, 5)))
    algorithm.fit(data.build_full_trainset())
    return np.array([algorithm.predict(u, i).est for u, i in zip(rows["user_id"], rows["item_id"])])


def baselines(train: pd.DataFrame, *row_sets: pd.DataFrame) -> list[dict[str, np.ndarray]]:
    """Each baseline, fitted once: its predictions for each of `row_sets`, by name (the names of the printed tables
    and of metrics.json).  A prediction depends on its own user and item only, so the sets are predicted together."""
    rows, mu = pd.concat(row_sets, ignore_index=True), train["ratings"].mean()
    predicted = {
        "Global mean": np.full(len(rows), mu),
        # the global mean for a user / item with no training rating
        "User mean": rows["user_id"].map(train.groupby("user_id")["ratings"].mean()).fillna(mu).to_numpy(),
        "Item mean": rows["item_id"].map(train.groupby("item_id")["ratings"].mean()).fillna(mu).to_numpy(),
        # Koren's regularized baseline estimates: r = mu + b_u + b_i, one ALS pass (items, then users), fixed lambdas
        "User+item bias": surprise_predictions(BaselineOnly(bsl_options={
            "method": "als", "n_epochs": 1, "reg_i": 25, "reg_u": 10}, verbose=False), train, rows),
        "SVD": surprise_predictions(SVD(random_state=0), train, rows),
        "SVD++": surprise_predictions(SVDpp(random_state=0), train, rows),
    }
    ends = np.cumsum([len(r) for r in row_sets])
    return [{name: p[end - len(r):end] for name, p in predicted.items()} for r, end in zip(row_sets, ends)]
