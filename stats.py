"""Comparing methods on the same rows: the rows of another file matched to a step's own, and the paired bootstrap
interval of a mean difference (the evaluation steps, 3_Predictor/4 and 5)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import bootstrap

from utils import KEY


def matched(rows: pd.DataFrame, other: pd.DataFrame, column: str):
    """`other[column]` for each of `rows`, matched on (user, item, time) (and the order among equal keys), as an
    array; None if `other` does not cover exactly these rows.  Missing values in `column` are kept as they are."""
    def keyed(df):
        return df[KEY].assign(nth=df.groupby(KEY).cumcount().to_numpy())

    if len(other) != len(rows):
        return None
    joined = keyed(rows).merge(keyed(other).assign(value=other[column].to_numpy()), how="left", on=KEY + ["nth"],
                               indicator=True)
    return None if (joined["_merge"] != "both").any() else joined["value"].to_numpy()


BOOTSTRAP_CHUNK = 2 ** 20  # resampled values held at once by paired_interval: 8 MB of them, 8 MB of their indices


def paired_interval(differences, seed: int = 0) -> tuple[float, float]:
    """The 95% interval of the mean of per-row differences between two methods on the same rows: a percentile
    bootstrap over the rows, 10,000 resamples, fixed seed (so reruns give the same interval).  The resamples are
    drawn in chunks of about BOOTSTRAP_CHUNK values (scipy's `batch`, from the same random stream: the same interval
    as all at once), so that memory stays bounded however many rows there are."""
    differences = np.asarray(differences, dtype=float)
    if len(differences) < 2:
        return float("nan"), float("nan")
    low, high = bootstrap((differences,), np.mean, n_resamples=10_000, method="percentile",
                          batch=max(1, BOOTSTRAP_CHUNK // len(differences)),
                          rng=np.random.default_rng(seed)).confidence_interval
    return float(low), float(high)
