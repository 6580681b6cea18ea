"""Evaluation harness: the paper's language-modelling protocol and a multiple-choice task, every weighting
strategy and baseline scored from the same member forwards.

Language modelling (paper section 4, appendix C): for each held-out document, the prompt is the first 32
tokens or the first 20% of its tokens, whichever is shorter; perplexity is measured on the rest, with the
weights solved on the prompt. One forward per member per document serves the weights and the scoring.

Multiple choice (lm-evaluation-harness ``loglikelihood`` semantics): a passage's true continuation among
four, the three distractors being same-length spans of other held-out documents of the same domain; the
answer is the option with the highest fused log-likelihood, weights solved on the passage.

Methods (rows): every single expert, ``best-single`` (the oracle: per domain, the best expert on it),
``uniform``, ``top1`` (Top1-PPL), ``cbtm`` (Eq. 8: softmax of minus the Euclidean distance between the
prompt's tf-idf vector and each expert's training-data centroid, probabilities mixed), ``sim-0.1``,
``sim-1`` (Eq. 4), ``greedy`` (Algorithm 1), ``grid`` and ``optimal``. Each is scored for packs of K experts,
K in {1, 2, 4, all}, averaged over every subset of that size.

Example::

    >>> from langchain_packllm.lab.pack import load_pack
    >>> manifest = load_pack("default", "shared")
    >>> engine = FusionEngine([load_member(p, name=n) for n, p in zip(manifest.expert_names, manifest.expert_paths)])
    >>> result = evaluate_lm(engine, {d: manifest.heldout_documents(d)[:40] for d in manifest.domain_names})
    >>> print(result.markdown())
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from langchain_packllm import weights as W
from langchain_packllm.engine import FusionEngine
from langchain_packllm.online import OnlineWeights

logger = logging.getLogger(__name__)

FUSION_METHODS = ("uniform", "top1", "cbtm", "sim-0.1", "sim-1", "greedy", "grid", "optimal")


# ---------------------------------------------------------------------------------------------- cBTM


class TfidfRouter:
    """cBTM's router (Eq. 8): ``w_k = softmax_k(-||h_P - h_k|| / temperature)`` where ``h_P`` is the
    prompt's (L2-normalised) tf-idf vector and ``h_k`` the centroid of expert k's training documents.

    ``temperature=1`` is Eq. 8 as printed; cBTM itself sharpens with a temperature of 0.1 (our default).
    """

    def __init__(
        self, expert_texts: Mapping[str, Sequence[str]], temperature: float = 0.1, max_features=50_000
    ):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.names = list(expert_texts)
        self.temperature = temperature
        corpus = [doc for name in self.names for doc in expert_texts[name]]
        self.vectorizer = TfidfVectorizer(max_features=max_features, sublinear_tf=True)
        matrix = self.vectorizer.fit_transform(corpus)
        centroids, start = [], 0
        for name in self.names:
            n = len(expert_texts[name])
            centroids.append(torch.from_numpy(matrix[start : start + n].mean(axis=0).A1))
            start += n
        self.centroids = torch.stack(centroids).double()  # (K, F)

    def weights(self, prompt: str, members: Sequence[str] | None = None) -> torch.Tensor:
        idx = [self.names.index(m) for m in (members or self.names)]
        h = torch.from_numpy(self.vectorizer.transform([prompt]).toarray()[0]).double()  # (F,)
        dist = torch.linalg.vector_norm(self.centroids[idx] - h, dim=-1)  # (K,)
        return torch.softmax(-dist / self.temperature, dim=0)


# ---------------------------------------------------------------------------------------------- scoring


def fused_logprobs(w: torch.Tensor, lp: torch.Tensor, method: str) -> torch.Tensor:
    """``(K,), (K, T, V) -> (T, V)`` log-probs of the fused model: logits mixed (Eq. 1), or probabilities
    mixed for cBTM (Eq. 8)."""
    w = w.to(lp)
    if method == "cbtm":
        return torch.logsumexp(lp + torch.log(w).view(-1, 1, 1), dim=0)
    return torch.log_softmax(torch.einsum("k,ktv->tv", w, lp), dim=-1)


def solve_method(
    method: str,
    prompt_lp: torch.Tensor,
    prompt_targets: torch.Tensor,
    *,
    prompt_text: str = "",
    member_names: Sequence[str] = (),
    router: TfidfRouter | None = None,
    grid_step: float = 0.05,
) -> torch.Tensor:
    """Weights of one method on one prompt (``prompt_lp`` ``(K, T, V)``)."""
    if method == "cbtm":
        if router is None:
            raise ValueError("The cbtm method needs the experts' training texts (a TfidfRouter).")
        return router.weights(prompt_text, member_names)
    if method.startswith("sim-"):
        return W.solve("sim", prompt_lp, prompt_targets, tau=float(method[4:]))
    return W.solve(method, prompt_lp, prompt_targets, grid_step=grid_step)


def subsets(n: int, ks: Sequence[int | None], max_subsets: int = 10, seed: int = 0) -> dict[int, list[tuple]]:
    """Member subsets per pack size K (None = all): every subset when there are few, else a fixed sample."""
    rng = random.Random(seed)
    out: dict[int, list[tuple]] = {}
    for k in ks:
        k = n if k is None else k
        if k > n or k < 1:
            continue
        combos = list(itertools.combinations(range(n), k))
        out[k] = combos if len(combos) <= max_subsets else sorted(rng.sample(combos, max_subsets))
    return out


@dataclass
class EvalResult:
    """Scores per (K, method, domain). ``metric`` is ``ppl`` (lower is better) or ``accuracy`` (higher)."""

    task: str
    metric: str
    members: list[str]
    domains: list[str]
    # scores[K][method][domain]; for ppl: total NLL and token count are kept to pool documents correctly
    nll: dict = field(default_factory=dict)
    count: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)  # mean weights of "all" methods per domain
    docs: dict = field(default_factory=dict)

    def add(self, k: int, method: str, domain: str, value: float, n: int) -> None:
        self.nll.setdefault(k, {}).setdefault(method, {}).setdefault(domain, 0.0)
        self.count.setdefault(k, {}).setdefault(method, {}).setdefault(domain, 0)
        self.nll[k][method][domain] += value
        self.count[k][method][domain] += n

    def finish_domain(self, domain: str, documents: int) -> None:
        """Record how many documents a domain had, and turn its summed weights into mean weights."""
        self.docs[domain] = documents
        for per_domain in self.weights.values():
            if domain in per_domain and documents:
                per_domain[domain] = [v / documents for v in per_domain[domain]]

    @property
    def lower_is_better(self) -> bool:
        return self.metric in ("ppl", "bpb")

    def score(self, k: int, method: str, domain: str) -> float:
        total, n = self.nll[k][method][domain], self.count[k][method][domain]
        if self.metric == "ppl":
            return math.exp(total / n)  # total NLL (nats) over n tokens
        if self.metric == "bpb":
            return total / n / math.log(2)  # total NLL (nats) over n bytes
        return total / n

    def average(self, k: int, method: str) -> float:
        return sum(self.score(k, method, d) for d in self.domains) / len(self.domains)

    def methods(self, k: int) -> list[str]:
        """Rows of the table for packs of size k; the full pack also lists each expert and the oracle."""
        rows = list(self.nll.get(k, {}))
        singles = [m for m in self.members if m in self.nll.get(1, {})]
        if k == len(self.members) and k > 1 and singles:
            rows = [*singles, "best-single", *rows]
        return rows

    def _cell(self, k: int, method: str, domain: str | None) -> float:
        if domain is None:
            return sum(self._cell(k, method, d) for d in self.domains) / len(self.domains)
        if method == "best-single":
            better = min if self.lower_is_better else max
            return better(self.score(1, m, domain) for m in self.members if m in self.nll[1])
        if method in self.members and method not in self.nll.get(k, {}):
            return self.score(1, method, domain)
        return self.score(k, method, domain)

    def markdown(self) -> str:
        """A per-domain table for the full pack, then the scaling table over K."""
        n = len(self.members)
        arrow = "lower is better" if self.lower_is_better else "higher is better"
        lines = [f"**{self.task}: {self.metric} ({arrow}), all {n} experts**", ""]
        lines.append("| method | " + " | ".join(self.domains) + " | average |")
        lines.append("|---" * (len(self.domains) + 2) + "|")
        best = {d: self._best(n, d) for d in [*self.domains, None]}
        for method in self.methods(n):
            cells = []
            for d in [*self.domains, None]:
                v = self._cell(n, method, d)
                text = self._fmt(v)
                cells.append(f"**{text}**" if v == best[d] else text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        ks = sorted(self.nll)
        lines += [
            "",
            f"**{self.task}: average {self.metric} by number of experts K (mean over subsets)**",
            "",
        ]
        lines.append("| method | " + " | ".join(f"K={k}" for k in ks) + " |")
        lines.append("|---" * (len(ks) + 1) + "|")
        for method in ["single", *self.fusion_rows()]:
            cells = []
            for k in ks:
                if method == "single":
                    singles = [m for m in self.nll[k] if m in self.members]
                    cells.append(
                        self._fmt(sum(self.average(k, m) for m in singles) / len(singles)) if singles else ""
                    )
                else:
                    cells.append(self._fmt(self.average(k, method)) if method in self.nll[k] else "")
            label = "single expert (mean)" if method == "single" else method
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def fusion_rows(self) -> list[str]:
        """The fusion methods scored at some K, in the usual order, then those with online weights
        (``method@N``) in the order they were scored."""
        scored = [m for per_k in self.nll.values() for m in per_k if m not in self.members]
        known = [m for m in FUSION_METHODS if m in scored]
        return known + [m for m in dict.fromkeys(scored) if m not in known]

    def _best(self, k: int, domain: str | None) -> float:
        vals = [self._cell(k, m, domain) for m in self.methods(k)]
        return min(vals) if self.lower_is_better else max(vals)

    def _fmt(self, v: float) -> str:
        if self.metric == "bpb":
            return f"{v:.3f}"
        return f"{v:.2f}" if self.metric == "ppl" else f"{100 * v:.1f}"

    def to_dict(self) -> dict:
        ks = sorted(self.nll)
        return {
            "task": self.task,
            "metric": self.metric,
            "members": self.members,
            "domains": self.domains,
            "scores": {
                str(k): {m: {d: self._cell(k, m, d) for d in self.domains} for m in self.methods(k)}
                for k in ks
            },
            "average": {str(k): {m: self._cell(k, m, None) for m in self.methods(k)} for k in ks},
            "mean_weights": self.weights,
            "documents": self.docs,
        }

    def plot(self, path: str) -> None:
        """Average score against K for every fusion method (matplotlib, PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ks = sorted(self.nll)
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in ["single", *self.fusion_rows()]:
            xs, ys = [], []
            for k in ks:
                if method == "single":
                    singles = [m for m in self.nll[k] if m in self.members]
                    if singles:
                        xs.append(k)
                        ys.append(sum(self.average(k, m) for m in singles) / len(singles))
                elif method in self.nll[k]:
                    xs.append(k)
                    ys.append(self.average(k, method) * (1 if self.lower_is_better else 100))
            if method == "single":
                ys = [y * (1 if self.lower_is_better else 100) for y in ys]
            if xs:
                style = "-o" if method.split("@")[0] in ("optimal", "greedy") else "--."
                ax.plot(xs, ys, style, label="single expert (mean)" if method == "single" else method)
        ax.set_xlabel("number of experts K")
        ax.set_ylabel({"ppl": "perplexity", "bpb": "bits per byte"}.get(self.metric, "accuracy (%)"))
        ax.set_xticks(ks)
        ax.set_title(f"{self.task}: fusion vs number of experts")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------- LM task


def lm_prompt_length(n_tokens: int) -> int:
    """The paper's prompt: the first 32 tokens or the first 20% of the tokens, whichever is shorter."""
    return min(32, int(0.2 * n_tokens))


def _prepare(engine: FusionEngine, expert_texts, methods, ks):
    """Member names, the cBTM router (when asked for and possible), the methods to run, the subsets."""
    router = TfidfRouter(expert_texts) if expert_texts is not None and "cbtm" in methods else None
    methods = [m for m in methods if m != "cbtm" or router is not None]
    return engine.names, router, methods, subsets(len(engine.names), ks)


def _score_subset(
    result: EvalResult,
    k: int,
    idx: list[int],
    n_subsets: int,
    methods: Sequence[str],
    prompt: tuple[torch.Tensor, torch.Tensor, str],
    rest: tuple[torch.Tensor, torch.Tensor],
    domain: str,
    count: float,
    *,
    router: TfidfRouter | None,
    grid_step: float,
    reweight_every: int | None = None,
) -> None:
    """Score the rest of one document with the members ``idx``: each alone when ``k == 1``, else every
    method with weights solved on the prompt. ``count`` is what the NLL is divided by (tokens or bytes).
    ``reweight_every=N`` adds a row ``method@N`` for each method that can follow the text (optimal,
    top1, sim-tau): weights re-solved every N tokens on the prompt and the rest scored so far
    (:class:`~langchain_packllm.online.OnlineWeights`, as decoding does).

    ``prompt`` is ``(logprobs (N, T_p, V), targets (T_p,), text)`` and ``rest`` ``(logprobs (N, T_r, V),
    targets (T_r,))``, over all N members. Returns nothing; adds to ``result`` (averaged over subsets).
    """
    names = result.members
    p_lp, p_y, prompt_text = prompt
    r_lp, r_y = rest
    if k == 1:
        nll = -float(r_lp[idx[0]].gather(-1, r_y[:, None]).double().sum())
        result.add(1, names[idx[0]], domain, nll, count)
        return
    for method in methods:
        w = solve_method(
            method, p_lp[idx], p_y, prompt_text=prompt_text,
            member_names=[names[i] for i in idx], router=router, grid_step=grid_step,
        )  # fmt: skip
        fused = fused_logprobs(w, r_lp[idx], method)
        nll = -float(fused.gather(-1, r_y[:, None]).double().sum())
        result.add(k, method, domain, nll / n_subsets, count / n_subsets)
        if k == len(names):
            acc = result.weights.setdefault(method, {}).setdefault(domain, [0.0] * len(names))
            for i, v in zip(idx, w.tolist()):
                acc[i] += v
        online = _online_strategy(method) if reweight_every else None
        if online is not None:
            strategy, tau = online
            sol = W.solve_with_stats(strategy, p_lp[idx], p_y, tau=tau)
            n_p = p_y.numel()
            state = OnlineWeights.start(strategy, reweight_every, [sol], [n_p], [n_p + 1], tau=tau)
            nll = -float(state.target_logprobs(r_lp[idx], r_y).sum())
            result.add(k, f"{method}@{reweight_every}", domain, nll / n_subsets, count / n_subsets)


def _online_strategy(method: str) -> tuple[str, float] | None:
    """The strategy and tau of an evaluation method whose weights can follow the text, else None."""
    if method in ("optimal", "top1"):
        return method, 1.0
    if method.startswith("sim-"):
        return "sim", float(method[4:])
    return None


def evaluate_lm(
    engine: FusionEngine,
    documents: Mapping[str, Sequence[str]],
    *,
    expert_texts: Mapping[str, Sequence[str]] | None = None,
    methods: Sequence[str] = FUSION_METHODS,
    ks: Sequence[int | None] = (1, 2, 4, None),
    max_tokens: int | None = None,
    grid_step: float = 0.05,
    min_tokens: int = 16,
    progress: bool = True,
    reweight_every: int | None = None,
) -> EvalResult:
    """Perplexity of every method on held-out ``documents`` (domain -> texts), paper protocol.
    ``reweight_every=N`` adds the rows ``method@N`` (weights that follow the text, see _score_subset)."""
    names, router, methods, groups = _prepare(engine, expert_texts, methods, ks)
    result = EvalResult("language modelling", "ppl", names, list(documents))
    limit = max_tokens or engine.max_length or 512
    total = sum(len(d) for d in documents.values())
    bar = tqdm(total=total, desc="eval lm", disable=not progress)
    for domain, docs in documents.items():
        used = 0
        for text in docs:
            bar.update(1)
            ids = engine.encode(text)[:limit]
            n = len(ids)
            n_prompt = lm_prompt_length(n)
            if n < min_tokens or n_prompt < 2:
                continue
            used += 1
            lp_list, input_ids, _, _ = engine.member_logprobs([ids])
            lp = torch.stack([x[0, :-1] for x in lp_list])  # (N, n-1, V): position i predicts token i+1
            targets = input_ids[0, 1:]  # (n-1,)
            prompt = (lp[:, : n_prompt - 1], targets[: n_prompt - 1], engine.decode(ids[:n_prompt]))
            rest = (lp[:, n_prompt - 1 :], targets[n_prompt - 1 :])
            for k, combos in groups.items():
                for combo in combos:
                    _score_subset(
                        result, k, list(combo), len(combos), methods, prompt, rest, domain,
                        rest[1].numel(), router=router, grid_step=grid_step, reweight_every=reweight_every,
                    )  # fmt: skip
        result.finish_domain(domain, used)
    bar.close()
    return result


def evaluate_lm_bytes(
    engine: FusionEngine,
    documents: Mapping[str, Sequence[str]],
    *,
    expert_texts: Mapping[str, Sequence[str]] | None = None,
    methods: Sequence[str] = FUSION_METHODS,
    ks: Sequence[int | None] = (1, None),
    grid_step: float = 0.05,
    min_tokens: int = 16,
    progress: bool = True,
    reweight_every: int | None = None,
) -> EvalResult:
    """The language-modelling protocol for packs whose members have different tokenizers, in bits per byte.

    Per-token perplexity is not comparable across tokenizers, so every row is scored in bits per byte of
    the same text. The prompt/rest split is made once per document in characters (the paper's 32 tokens
    or 20% rule, counted with the first member's tokenizer); each single expert scores the rest on its own
    tokenization; each fusion reads the document with the reference tokenizer (the lowest bits per byte on
    the prompt within the subset) and the others through the engine's alignment.
    """
    names, router, methods, groups = _prepare(engine, expert_texts, methods, ks)
    result = EvalResult("language modelling (mixed tokenizers)", "bpb", names, list(documents))
    limit = engine.max_length or 512
    first_tok = engine.members[0].tokenizer
    bar = tqdm(total=sum(len(d) for d in documents.values()), desc="eval lm (bytes)", disable=not progress)
    for domain, docs in documents.items():
        used = 0
        for text in docs:
            bar.update(1)
            enc = first_tok(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"][: limit // 2]  # leave room: other tokenizers may need more tokens
            n = len(offsets)
            n_prompt = lm_prompt_length(n)
            if n < min_tokens or n_prompt < 2:
                continue
            cut, end = offsets[n_prompt - 1][1], offsets[-1][1]
            text = text[:end]
            prompt_text = text[:cut]
            used += 1
            bpb = engine.bits_per_byte(prompt_text)
            by_ref: dict[int, tuple] = {}
            for k, combos in groups.items():
                for combo in combos:
                    idx = list(combo)
                    ref = min(idx, key=lambda i: bpb[i] if math.isfinite(bpb[i]) else math.inf)
                    if ref not in by_ref:
                        by_ref[ref] = _reference_logprobs(engine, ref, text, cut, limit)
                    lp, targets, n_p, n_bytes = by_ref[ref]
                    prompt = (lp[:, : n_p - 1], targets[: n_p - 1], prompt_text)
                    rest = (lp[:, n_p - 1 :], targets[n_p - 1 :])
                    _score_subset(
                        result, k, idx, len(combos), methods, prompt, rest, domain, n_bytes,
                        router=router, grid_step=grid_step, reweight_every=reweight_every,
                    )  # fmt: skip
        result.finish_domain(domain, used)
    bar.close()
    return result


def _reference_logprobs(engine: FusionEngine, ref: int, text: str, cut: int, limit: int):
    """All members' log-probs on ``text`` read with member ``ref``'s tokenizer: ``(K, T, V_ref)``, the
    targets ``(T,)``, the number of prompt tokens and the UTF-8 bytes the scored (rest) tokens cover.

    The text is encoded once (encoding the rest on its own would make a Metaspace tokenizer invent a
    leading space); prompt tokens are those that start before character ``cut``, so a token straddling
    the cut counts with the prompt and the rest's byte count starts after it.
    """
    tok = engine.members[ref].tokenizer
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"])[:limit], list(enc["offset_mapping"])[:limit]
    specials = set(tok.all_special_ids)
    n_prompt = sum(1 for i, (start, _) in zip(ids, offsets) if i in specials or start < cut)
    rest_start = offsets[n_prompt][0] if n_prompt < len(ids) else len(text)
    n_bytes = len(text[rest_start : offsets[-1][1]].encode("utf-8"))
    lp_list, input_ids, _, _ = engine.member_logprobs([ids], reference=engine.reference(ref))
    return torch.stack([x[0, :-1] for x in lp_list]), input_ids[0, 1:], n_prompt, n_bytes


# ---------------------------------------------------------------------------------------------- MC task


@dataclass
class Question:
    domain: str
    context: list[int]
    options: list[list[int]]
    answer: int


def build_mc_questions(
    engine: FusionEngine,
    documents: Mapping[str, Sequence[str]],
    *,
    context_tokens: int = 48,
    option_tokens: int = 12,
    n_options: int = 4,
    seed: int = 0,
) -> list[Question]:
    """Pick-the-true-continuation questions from held-out text, distractors from the same domain."""
    rng = random.Random(seed)
    questions = []
    need = context_tokens + option_tokens
    for domain, docs in documents.items():
        encoded = [ids for ids in (engine.encode(d) for d in docs) if len(ids) >= need]
        if len(encoded) < n_options:
            logger.warning("Domain %s has fewer than %d usable documents; no questions.", domain, n_options)
            continue
        for i, ids in enumerate(encoded):
            others = rng.sample([j for j in range(len(encoded)) if j != i], n_options - 1)
            distractors = []
            for j in others:
                start = rng.randrange(0, len(encoded[j]) - option_tokens + 1)
                distractors.append(encoded[j][start : start + option_tokens])
            answer = rng.randrange(n_options)
            options = distractors[:answer] + [ids[context_tokens:need]] + distractors[answer:]
            questions.append(Question(domain, ids[:context_tokens], options, answer))
    return questions


def evaluate_mc(
    engine: FusionEngine,
    documents: Mapping[str, Sequence[str]],
    *,
    expert_texts: Mapping[str, Sequence[str]] | None = None,
    methods: Sequence[str] = FUSION_METHODS,
    ks: Sequence[int | None] = (1, 2, 4, None),
    grid_step: float = 0.05,
    progress: bool = True,
    **question_kwargs,
) -> EvalResult:
    """Accuracy of every method on multiple-choice questions built from held-out ``documents``."""
    names, router, methods, groups = _prepare(engine, expert_texts, methods, ks)
    questions = build_mc_questions(engine, documents, **question_kwargs)
    result = EvalResult(
        "multiple choice", "accuracy", names, [d for d in documents if any(q.domain == d for q in questions)]
    )
    for q in tqdm(questions, desc="eval mc", disable=not progress):
        n_ctx = len(q.context)
        lp_list, input_ids, _, _ = engine.member_logprobs([q.context + o for o in q.options])
        lp = torch.stack([x[:, :-1] for x in lp_list])  # (N, O, L-1, V); equal lengths, no padding
        targets = input_ids[:, 1:]  # (O, L-1)
        p_lp, p_y = lp[:, 0, : n_ctx - 1], targets[0, : n_ctx - 1]
        prompt_text = engine.decode(q.context)
        for k, combos in groups.items():
            for combo in combos:
                idx = list(combo)
                for method in methods if k > 1 else ["single"]:
                    if method == "single":
                        w, label = torch.ones(1, dtype=torch.float64), names[idx[0]]
                    else:
                        label = method
                        w = solve_method(
                            method, p_lp[idx], p_y, prompt_text=prompt_text,
                            member_names=[names[i] for i in idx], router=router, grid_step=grid_step,
                        )  # fmt: skip
                    scores = []
                    for o in range(len(q.options)):
                        fused = fused_logprobs(w, lp[idx, o, n_ctx - 1 :], method)
                        scores.append(float(fused.gather(-1, targets[o, n_ctx - 1 :, None]).sum()))
                    correct = float(max(range(len(scores)), key=scores.__getitem__) == q.answer)
                    result.add(k, label, q.domain, correct / len(combos), 1 / len(combos))
    for d in result.domains:
        result.docs[d] = sum(q.domain == d for q in questions)
    return result


# ---------------------------------------------------------------------------------------------- CLI


def _parse_ks(text: str) -> list[int | None]:
    return [None if k.strip() == "all" else int(k) for k in text.split(",")]


def _eval(args) -> int:
    import json
    from pathlib import Path

    from langchain_packllm.lab.pack import build_pack
    from langchain_packllm.members import load_member

    if args.pack == "real":
        return _eval_real(args)
    size = "tiny" if args.tiny else "default"
    manifest = build_pack(size, args.variant, cache_dir=args.cache_dir, install=args.install)
    engine = FusionEngine(
        [
            load_member(p, name=n, device=args.device)
            for n, p in zip(manifest.expert_names, manifest.expert_paths)
        ]
    )
    documents = {d: manifest.heldout_documents(d)[: args.docs] for d in manifest.domain_names}
    methods = args.methods.split(",")
    expert_texts = None
    if "cbtm" in methods:
        expert_texts = {e.name: manifest.train_documents(e.domain) for e in manifest.experts}
    common = dict(
        expert_texts=expert_texts,
        methods=args.methods.split(","),
        ks=_parse_ks(args.ks),
        grid_step=args.grid_step,
    )
    online = {"reweight_every": args.reweight_every}
    if args.task == "lm" and engine.alignment != "none":
        result = evaluate_lm_bytes(engine, documents, **common, **online)
    elif args.task == "lm":
        result = evaluate_lm(engine, documents, **common, **online)
    else:
        result = evaluate_mc(engine, documents, **common)
    table = result.markdown()
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{args.task}-{size}-{args.variant}"
        stem.with_suffix(".md").write_text(table + "\n")
        stem.with_suffix(".json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        result.plot(str(stem.with_suffix(".png")))
        print(f"\nwrote {stem}.md, .json, .png")
    return 0


def _eval_real(args) -> int:
    """``packllm eval lm --pack real``: the real pack in bits per byte on held-out text of four domains
    (there is no training data to route by, so no cBTM)."""
    import json
    from pathlib import Path

    from langchain_packllm.lab.pack.real import REAL_NAMES, real_eval_documents, real_pack_paths
    from langchain_packllm.members import load_member

    if args.task != "lm":
        raise SystemExit("--pack real supports the lm task only.")
    paths = real_pack_paths(args.cache_dir, progress=True)
    engine = FusionEngine([load_member(p, name=n, device=args.device) for n, p in zip(REAL_NAMES, paths)])
    documents = real_eval_documents(args.docs)
    methods = [m for m in args.methods.split(",") if m != "cbtm"]
    result = evaluate_lm_bytes(
        engine, documents, methods=methods, ks=_parse_ks(args.ks), grid_step=args.grid_step,
        reweight_every=args.reweight_every,
    )  # fmt: skip
    table = result.markdown()
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / "lm-real"
        stem.with_suffix(".md").write_text(table + "\n")
        stem.with_suffix(".json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        result.plot(str(stem.with_suffix(".png")))
        print(f"\nwrote {stem}.md, .json, .png")
    return 0


def add_eval_commands(sub) -> None:
    p = sub.add_parser("eval", help="evaluate every weighting strategy and baseline on the expert pack")
    p.add_argument("task", choices=["lm", "mc"], help="lm: perplexity (paper protocol); mc: multiple choice")
    p.add_argument("--tiny", action="store_true", help="use the tiny pack")
    p.add_argument(
        "--pack",
        choices=("expert", "real"),
        default="expert",
        help="expert: the trained domain-expert pack (default); real: SmolLM2 + Gemma 3 + Qwen2.5-Coder on "
        "held-out code, documentation, manual pages and licenses (lm only)",
    )
    p.add_argument("--variant", default="shared", choices=["shared", "mixed"], help="mixed: own tokenizers")
    p.add_argument("--docs", type=int, default=40, help="held-out documents per domain")
    p.add_argument("--methods", default=",".join(FUSION_METHODS))
    p.add_argument("--ks", default="1,2,4,all", help="pack sizes, comma-separated ('all' = every expert)")
    p.add_argument("--grid-step", type=float, default=0.05)
    p.add_argument(
        "--reweight-every",
        type=int,
        default=None,
        metavar="N",
        help="lm: also score optimal, top1 and sim with weights re-solved every N tokens on the text so far "
        "(rows method@N)",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--install", action="store_true", help="apt-get install missing Debian corpora (root)")
    p.add_argument("--out", default=None, help="directory for the .md, .json and .png results")
    p.set_defaults(func=_eval)
