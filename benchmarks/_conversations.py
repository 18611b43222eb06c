"""A near-dedup corpus of real conversations with non-Latin scripts, and its exact ground truth.

Base documents are real chats (chitchat-dataset, the demo's source, windows of up to 8, 6 and 4 messages, joined
by newlines) and the demo's verifiable tasks. A share of the chats (``non_latin``, default 40 %) is transliterated
letter by letter into Cyrillic, Greek, CJK or Devanagari (real word statistics in non-Latin scripts; the same
transliteration as benchmarks/near_dedup_non_latin.py), and about 13 % of the documents are planted copies of an
earlier one: "case" (upper / lower / title / swapcase), "whitespace" (some spaces become double spaces, newlines or
tabs), "edit" (1-10 word substitutions, insertions or deletions with words of another document in the same script,
so some copies fall below the threshold on purpose) and "edit+case".

Real chats also contain near-duplicates nobody planted (overlapping windows, short templated tasks), so the ground
truth is not the planted groups: it is every pair of documents with exact Jaccard >= the threshold over the whole
corpus, found with prefix filtering (Chaudhuri et al. 2006; Bayardo et al. 2007's all-pairs): with the tokens of
each set ordered from rarest to most frequent, two sets with Jaccard >= t share a token within the first
|S| - ceil(t |S|) + 1 tokens of each, so probing those prefixes finds every such pair, and each candidate is then
checked exactly with Python sets. Exact, and seconds instead of the 5e9 pairs of a full comparison.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

import numpy as np

SCRIPTS = {
    "cyrillic": dict(zip("abcdefghijklmnopqrstuvwxyz", "абцдефгхийклмнопкрстувшхыз", strict=True)),
    "greek": dict(zip("abcdefghijklmnopqrstuvwxyz", "αβψδεφγηιξκλμνοπθρστυωςχυζ", strict=True)),
    "cjk": {c: chr(0x4E00 + 37 * i) for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")},
    "devanagari": {c: chr(0x0905 + i) for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")},
}
KINDS = ("base", "case", "whitespace", "edit", "edit+case")
_WORD = re.compile(r"[^\W_]+")


def transliterate(text: str, script: str) -> str:
    table = SCRIPTS[script]
    return "".join(table.get(ch, ch) for ch in text.lower()) + " — «ok»"


def words_alnum(text: str) -> list[str]:
    """Maximal runs of letters/digits of the lowercased text: the tokenizer of ours, datasketch and rensa here."""
    return _WORD.findall(text.lower())


def words_space(text: str) -> list[str]:
    """Whitespace tokens of the lowercased text, punctuation attached: the naive ground truth."""
    return text.lower().split()


def shingle_set(words: list[str], n: int) -> set[tuple[str, ...]]:
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def build_conversations(n: int, seed: int = 0, copy_frac: float = 0.13, non_latin: float = 0.4, tasks: float = 0.02):
    """Texts in final order; per document the planted kind, the planted group (-1: none), the edits, the script."""
    from sft_engine.demo_data import chitchat_rows, verifiable_task_rows

    rng = np.random.default_rng(seed)
    pool: list[str] = []
    seen: set[str] = set()
    for m in (8, 6, 4):
        for r in chitchat_rows(limit=None, max_messages=m):
            t = "\n".join(msg["content"] for msg in r["messages"])
            if t not in seen:
                seen.add(t)
                pool.append(t)
    n_copies = round(copy_frac * n)
    n_base = n - n_copies
    n_tasks = round(tasks * n_base)
    n_chat = n_base - n_tasks
    n_other = round(non_latin * n_chat)
    n_latin = n_chat - n_other
    if max(n_latin, n_other) > len(pool):
        raise ValueError(f"--n {n} needs {max(n_latin, n_other):,} distinct chats; chitchat gives {len(pool):,}")
    names = list(SCRIPTS)
    base, script = [], []
    for i in rng.choice(len(pool), n_latin, replace=False).tolist():
        base.append(pool[i])
        script.append("latin")
    for i in rng.choice(len(pool), n_other, replace=False).tolist():
        s = names[int(rng.integers(len(names)))]
        base.append(transliterate(pool[i], s))
        script.append(s)
    for r in verifiable_task_rows(n_tasks, seed=seed):
        base.append("\n".join([r["instruction"], r["input"], r["output"]]))
        script.append("latin")
    shuffle = rng.permutation(len(base))
    base = [base[i] for i in shuffle.tolist()]
    script = [script[i] for i in shuffle.tolist()]
    by_script: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(script):
        by_script[s].append(i)

    n_per: list[int] = []
    while sum(n_per) < n_copies:
        n_per.append(int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15])))
    n_per[-1] -= sum(n_per) - n_copies
    if n_per[-1] == 0:
        n_per.pop()
    sources = rng.choice(n_base, size=len(n_per), replace=False)
    base_key = rng.random(n_base) * 0.9  # final order: sort by key; copies come after their source
    docs, keys, kinds, groups, edits, scripts = list(base), list(base_key), [0] * n_base, [-1] * n_base, [0] * n_base, list(script)
    case_fns = (str.upper, str.lower, str.title, str.swapcase)
    seps, seps_p = np.array([" ", "  ", "\n", "\t", " \n"], dtype=object), [0.85, 0.06, 0.04, 0.03, 0.02]
    for g, (src, k) in enumerate(zip(sources.tolist(), n_per)):
        groups[src] = g
        for _ in range(k):
            kind = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.2, 0.45, 0.15]))
            text, n_edit = base[src], 0
            if kind in (3, 4):
                tokens = text.split(" ")
                donors = by_script[script[src]]
                donor = base[donors[int(rng.integers(len(donors)))]].split(" ")
                n_edit = int(rng.integers(1, 11))
                for _e in range(n_edit):
                    op, pos = int(rng.integers(3)), int(rng.integers(len(tokens)))
                    new = donor[int(rng.integers(len(donor)))]
                    if op == 0:
                        tokens[pos] = new
                    elif op == 1:
                        tokens.insert(pos, new)
                    elif len(tokens) > 6:
                        del tokens[pos]
                text = " ".join(tokens)
            if kind in (1, 4):
                text = case_fns[int(rng.integers(4))](text)
            if kind == 2:
                parts = text.split(" ")
                gaps = rng.choice(seps, size=len(parts) - 1, p=seps_p).tolist()
                text = "".join(p + s for p, s in zip(parts, gaps + [""]))
            docs.append(text)
            keys.append(base_key[src] + (1 - base_key[src]) * rng.random())
            kinds.append(kind)
            groups.append(g)
            edits.append(n_edit)
            scripts.append(script[src])
    order = np.argsort(np.array(keys), kind="stable")
    return ([docs[i] for i in order.tolist()], np.array(kinds, dtype=np.int8)[order], np.array(groups)[order],
            np.array(edits, dtype=np.int16)[order], np.array(scripts)[order])


def all_pairs(sets: list[set], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of non-empty sets with exact Jaccard >= ``threshold``, and its Jaccard (prefix filtering)."""
    freq = Counter(tok for s in sets for tok in s)
    # Any fixed global order works; rarest first keeps the probed lists short. Ties keep first-seen order.
    rank = {tok: r for r, (tok, _) in enumerate(sorted(freq.items(), key=lambda kv: kv[1]))}
    del freq
    index: dict[int, list[int]] = defaultdict(list)
    pairs, sims = [], []
    for j, s in enumerate(sets):
        if not s:
            continue
        size = len(s)
        ordered = sorted(rank[t] for t in s)
        prefix = ordered[: size - math.ceil(threshold * size) + 1]
        cands = {i for t in prefix for i in index[t]}
        for i in sorted(cands):
            other = sets[i]
            if threshold * size <= len(other) <= size / threshold:  # the size filter: J <= min/max
                inter = len(s & other)
                jac = inter / (size + len(other) - inter)
                if jac >= threshold:
                    pairs.append((i, j))
                    sims.append(jac)
        for t in prefix:
            index[t].append(j)
    return np.array(pairs, dtype=np.int64).reshape(-1, 2), np.array(sims)


def truth(texts: list[str], tokenize, ngram: int, threshold: float, near: float = 0.7) -> dict[str, np.ndarray]:
    """Exact ground truth under one tokenizer: documents with an earlier document at Jaccard >= ``threshold``
    (``flagged``), their best Jaccard with an earlier document when at least ``near`` (``best``, else 0), the pairs."""
    sets = [shingle_set(tokenize(t), ngram) for t in texts]
    pairs, sims = all_pairs(sets, near)
    flagged = np.zeros(len(texts), dtype=bool)
    flagged[pairs[sims >= threshold, 1]] = True
    best = np.zeros(len(texts))
    np.maximum.at(best, pairs[:, 1], sims)
    keep = sims >= threshold
    return {"flagged": flagged, "best": best, "pairs": pairs[keep], "sims": sims[keep]}
