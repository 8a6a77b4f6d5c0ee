"""Choosing atoms by what their documents do (pure: detector flags and atom tables in, choices out).

Never reads a label column: an atom's behaviour is read off the RESPONSES of its top documents (the
response tokens of data/, `loss_mask == 1`, decoded with the run's tokenizer), through the same
detectors the evaluation uses. For each detector the chosen atom is the one whose top documents the
detector fires on most; ties are broken by coherence (NaN coherence ranks last), then by the smaller
atom id so the choice is deterministic. Atoms with fewer than `min_docs` top documents are not
candidates (a rate over two documents says little).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Choice:
    behaviour: str
    atom: int
    rate: float
    """Share of the atom's top documents whose response the detector fires on."""
    k: int
    n: int
    coherence: float
    n_active_docs: int
    corpus_rate: float
    """The detector's rate over every training document (what a random atom would show)."""

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (
            f"{self.behaviour:<10} atom {self.atom:>4}  coherence {self.coherence:.3f}  active docs {self.n_active_docs:>4}  "
            f"rate among top docs {100 * self.rate:5.1f}% ({self.k}/{self.n}; all documents {100 * self.corpus_rate:.1f}%)"
        )


def response_token_ids(input_ids: Sequence[int], loss_mask: Sequence[int]) -> list[int]:
    """The response tokens of one document (`loss_mask[t] == 1`)."""
    ids = np.asarray(input_ids)
    mask = np.asarray(loss_mask).astype(bool)
    return ids[mask].tolist()


def detector_flags(responses: Mapping[int, str], detectors: Mapping[str, Callable[[str | None], bool]]) -> dict[str, dict[int, bool]]:
    """{behaviour: {doc_id: fires}}."""
    return {name: {d: bool(det(text)) for d, text in responses.items()} for name, det in detectors.items()}


def choose_by_behaviour(
    atoms: Sequence[int],
    top_doc_ids: Sequence[Sequence[int]],
    coherence: Sequence[float],
    n_active_docs: Sequence[int],
    flags: Mapping[str, Mapping[int, bool]],
    top_docs: int = 20,
    min_docs: int = 5,
) -> dict[str, Choice | None]:
    """Per behaviour, the atom whose top documents fire most (None: no candidate fires at all)."""
    out: dict[str, Choice | None] = {}
    for name, f in flags.items():
        corpus_rate = float(np.mean(list(f.values()))) if f else 0.0
        best: tuple | None = None
        for a, tops, coh, nact in zip(atoms, top_doc_ids, coherence, n_active_docs):
            docs = [int(d) for d in list(tops)[:top_docs] if int(d) in f]
            if len(docs) < min_docs:
                continue
            k = sum(f[d] for d in docs)
            rate = k / len(docs)
            coh_key = float(coh) if coh is not None and np.isfinite(coh) else -np.inf
            key = (rate, coh_key, -int(a))
            if best is None or key > best[0]:
                best = (key, Choice(name, int(a), rate, k, len(docs), float(coh) if coh is not None else float("nan"), int(nact), corpus_rate))
        out[name] = best[1] if best is not None and best[1].k > 0 else None
    return out
