"""The real review file of the demo: the Amazon 2014 Musical Instruments 5-core reviews.

    python scripts/demo_reviews.py [--download]

prints the file's path: $REVIEWS_FILE where set, else the copy in the repository's Data/downloads/; with
--download, where neither is there, first fetches the official file into Data/downloads/ and checks its md5.
"""
import argparse
import hashlib
import os
import sys
import urllib.request
from pathlib import Path

NAME = "reviews_Musical_Instruments_5.json.gz"
DOWNLOADED = Path(__file__).resolve().parents[1] / "Data" / "downloads" / NAME
URL = f"http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/{NAME}"
MD5 = "8035b6e3f9194844785b3f4cee296577"


def reviews_file() -> Path:
    return Path(os.environ.get("REVIEWS_FILE") or DOWNLOADED)


def download(path: Path) -> Path:
    if not path.exists():
        print(f"downloading {URL} to {path}", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        urllib.request.urlretrieve(URL, f"{path}.part")
        os.replace(f"{path}.part", path)
    with path.open("rb") as f:
        if hashlib.file_digest(f, "md5").hexdigest() != MD5:
            sys.exit(f"error: {path} does not have the md5 {MD5} of the official file; delete it and rerun")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--download", action="store_true", help="fetch the official file where it is absent")
    args = parser.parse_args()
    path = reviews_file()
    if not path.exists() and args.download:
        if os.environ.get("REVIEWS_FILE"):
            sys.exit(f"error: REVIEWS_FILE={path} does not exist")
        path = download(path)
    print(path)
