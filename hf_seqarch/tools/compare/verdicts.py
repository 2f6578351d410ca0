"""One verdict per classic claim, computed from the measured numbers.

Each function reads results["architectures"] and returns {"claim", "verdict", "evidence"}. The
thresholds below are the only judgement calls; they sit above the noise of timing on a shared
machine and of accuracy on a few hundred held-out examples, and they are printed in the report.
"""

import math

from .architectures import LINEAR_TIME, RECURRENT

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
SPEED_MARGIN = 1.10  # a throughput ratio counts beyond 10% either way
EXPONENT_MARGIN = 0.25  # cost exponents this far apart differ (1 = linear in length, 2 = quadratic)
LINEAR_EXPONENT = 1.25  # at most this: linear within noise
CONSTANT_GROWTH = 1.05  # cache bytes that grow by at most 5% over the context range are constant
ACCURACY_MARGIN = 0.10  # accuracy gaps of 10 points or more count
LEARNED = 0.50  # below this accuracy the budget did not teach attention the task: recall untestable

CLAIMS = {
    "parallel": "Attention trains in parallel while recurrences train step by step (faster training)",
    "quadratic": "Attention costs O(n^2) in sequence length, a recurrence O(n)",
    "streaming": "Recurrent models stream with constant memory while a KV cache grows",
    "recall": "Attention reaches far-back tokens directly while recurrences forget",
    "linear_time": "Linear-time models (Mamba-2, linear attention) aim at both: linear cost and recall",
}

THRESHOLDS = (
    f"speed ratios count beyond {SPEED_MARGIN:.2f}x; cost exponents (log-log slope of time per sequence "
    f"between the two longest lengths) differ when {EXPONENT_MARGIN} apart and are linear up to {LINEAR_EXPONENT} "
    f"(a linear-time model's: up to {EXPONENT_MARGIN} above the LSTM/GRU's or above 1, whichever is larger, but at "
    f"least {EXPONENT_MARGIN} below "
    f"the transformer's where that is over {LINEAR_EXPONENT + EXPONENT_MARGIN}); "
    f"a cache is constant when it grows by at most {CONSTANT_GROWTH - 1:.0%}; accuracy gaps count from "
    f"{ACCURACY_MARGIN:.0%}, and a recall task (MQAR at its longest length, selective copying) counts once "
    f"attention reaches {LEARNED:.0%} on it"
)


def _verdict(key, verdict, evidence):
    return {"claim": CLAIMS[key], "key": key, "verdict": verdict, "evidence": evidence}


def _recurrence(archs):
    return next((name for name in RECURRENT if archs.get(name, {}).get("training_speed")), None)


def cost_exponent(rows, field="median_step_seconds") -> float | None:
    """Slope of log(cost per sequence) against log(length) between the two longest lengths."""
    if not rows or len(rows) < 2:
        return None
    a, b = sorted(rows, key=lambda r: r["seq_len"])[-2:]
    per_seq = lambda r: r[field] / r["batch_size"]  # noqa: E731
    if per_seq(a) <= 0 or per_seq(b) <= 0:
        return None
    return math.log(per_seq(b) / per_seq(a)) / math.log(b["seq_len"] / a["seq_len"])


def cache_growth(rows) -> tuple[float, float] | None:
    """(cache bytes growth, context growth) from the shortest to the longest context."""
    if not rows or len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    if first["cache_bytes"] <= 0:
        return None
    return last["cache_bytes"] / first["cache_bytes"], last["context"] / first["context"]


def recall_scores(arch) -> dict[str, float]:
    """The recall tasks' accuracies: MQAR at its longest length and selective copying, where scored."""
    scores = {}
    mqar = arch.get("mqar", {}).get("accuracy")
    if mqar:
        length = max(mqar, key=int)
        scores[f"MQAR at {length}"] = mqar[length]
    if arch.get("selective_copying", {}).get("accuracy") is not None:
        scores["selective copying"] = arch["selective_copying"]["accuracy"]
    return scores


def learned_tasks(archs, rec) -> list[str]:
    """Recall tasks that attention learned within the budget: only on those can a gap to `rec` mean anything."""
    att, rnn = recall_scores(archs.get("transformer", {})), recall_scores(archs.get(rec or "", {}))
    return [task for task, accuracy in att.items() if task in rnn and accuracy >= LEARNED]


def parallel_training(archs, environment=None):
    rec = _recurrence(archs)
    if rec is None or not archs.get("transformer", {}).get("training_speed"):
        return _verdict("parallel", INCONCLUSIVE, "needs the transformer and an LSTM/GRU measured")
    att = {r["seq_len"]: r["tokens_per_second"] for r in archs["transformer"]["training_speed"]}
    rnn = {r["seq_len"]: r["tokens_per_second"] for r in archs[rec]["training_speed"]}
    ratios = {n: att[n] / rnn[n] for n in sorted(att) if n in rnn}
    evidence = f"transformer/{rec} training tokens/s: " + ", ".join(f"{r:.2f}x at {n}" for n, r in ratios.items())
    if environment and environment.get("device") == "cpu":
        threads = environment.get("torch_threads")
        evidence += f" on {threads} CPU thread(s)" + (", where parallel work can only use the vector units" if threads == 1 else "")
    if all(r >= SPEED_MARGIN for r in ratios.values()):
        return _verdict("parallel", SUPPORTED, evidence)
    if all(r <= 1 / SPEED_MARGIN for r in ratios.values()):
        return _verdict("parallel", NOT_SUPPORTED, evidence + f" (the {rec} is faster at every length on this device)")
    if all(1 / SPEED_MARGIN < r < SPEED_MARGIN for r in ratios.values()):
        return _verdict("parallel", INCONCLUSIVE, evidence + f" (within {SPEED_MARGIN - 1:.0%} of each other at every "
                                                             "length)")
    clearly = {"the transformer": [n for n, r in ratios.items() if r >= SPEED_MARGIN],
               f"the {rec}": [n for n, r in ratios.items() if r <= 1 / SPEED_MARGIN]}
    faster = "; ".join(f"{who} at {', '.join(map(str, lengths))}" for who, lengths in clearly.items() if lengths)
    within = sum(map(len, clearly.values())) < len(ratios)
    return _verdict("parallel", INCONCLUSIVE, evidence + f" (clearly faster: {faster}"
                                                         + (f"; within {SPEED_MARGIN - 1:.0%} elsewhere)" if within else ")"))


def quadratic_cost(archs):
    rec = _recurrence(archs)
    if rec is None or not archs.get("transformer", {}).get("training_speed"):
        return _verdict("quadratic", INCONCLUSIVE, "needs the transformer and an LSTM/GRU measured")
    att, rnn = cost_exponent(archs["transformer"]["training_speed"]), cost_exponent(archs[rec]["training_speed"])
    if att is None or rnn is None:
        return _verdict("quadratic", INCONCLUSIVE, "needs at least two sequence lengths")
    att_mem = cost_exponent(archs["transformer"]["training_speed"], "peak_memory_bytes")
    rnn_mem = cost_exponent(archs[rec]["training_speed"], "peak_memory_bytes")
    evidence = (f"time per sequence grows as n^{att:.2f} for the transformer and n^{rnn:.2f} for the {rec} "
                f"(peak memory per sequence: n^{_exp(att_mem)} and n^{_exp(rnn_mem)})")
    if att - rnn >= EXPONENT_MARGIN and rnn <= LINEAR_EXPONENT < att:
        return _verdict("quadratic", SUPPORTED, evidence)
    if att - rnn >= EXPONENT_MARGIN and att <= LINEAR_EXPONENT:  # (the recurrence's below n^1: noise or fixed costs)
        return _verdict("quadratic", INCONCLUSIVE, evidence + " (attention's own cost grows no faster than linear, up "
                                                              f"to n^{LINEAR_EXPONENT}, at these lengths)")
    if att - rnn < EXPONENT_MARGIN / 2:
        return _verdict("quadratic", NOT_SUPPORTED, evidence + " (attention's cost grows no faster than the "
                                                               f"{rec}'s at these lengths)")
    if rnn > LINEAR_EXPONENT:
        return _verdict("quadratic", INCONCLUSIVE, evidence + f" (the {rec}'s own cost grows faster than linear: "
                                                              f"above n^{LINEAR_EXPONENT} at these lengths)")
    return _verdict("quadratic", INCONCLUSIVE, evidence + f" (attention's exponent exceeds the {rec}'s by "
                                                          f"{att - rnn:.2f}, less than the margin of {EXPONENT_MARGIN})")


def streaming_memory(archs):
    rec = next((n for n in RECURRENT if archs.get(n, {}).get("decode")), None)  # the first with decoding measured
    if rec is None or not archs.get("transformer", {}).get("decode"):
        return _verdict("streaming", INCONCLUSIVE, "needs decoding measured for the transformer and an LSTM/GRU")
    rnn, att = cache_growth(archs[rec]["decode"]), cache_growth(archs["transformer"]["decode"])
    if rnn is None or att is None:
        return _verdict("streaming", INCONCLUSIVE, "needs at least two context lengths")
    rows_r, rows_a = archs[rec]["decode"], archs["transformer"]["decode"]
    evidence = (f"over x{att[1]:.0f} context ({rows_a[0]['context']} -> {rows_a[-1]['context']} tokens): "
                f"{rec} cache {_kib(rows_r[0]['cache_bytes'])} -> {_kib(rows_r[-1]['cache_bytes'])} (x{rnn[0]:.2f}), "
                f"transformer KV cache {_kib(rows_a[0]['cache_bytes'])} -> {_kib(rows_a[-1]['cache_bytes'])} (x{att[0]:.2f}); "
                f"decode ms/token {rec} {rows_r[0]['ms_per_token']:.2f} -> {rows_r[-1]['ms_per_token']:.2f}, "
                f"transformer {rows_a[0]['ms_per_token']:.2f} -> {rows_a[-1]['ms_per_token']:.2f}")
    if rnn[0] <= CONSTANT_GROWTH and att[0] >= 0.5 * att[1]:
        return _verdict("streaming", SUPPORTED, evidence)
    if rnn[0] > CONSTANT_GROWTH or att[0] <= CONSTANT_GROWTH:
        return _verdict("streaming", NOT_SUPPORTED, evidence)
    return _verdict("streaming", INCONCLUSIVE, evidence)


def recall(archs):
    rec = next((n for n in RECURRENT if recall_scores(archs.get(n, {}))), None)
    if rec is None or not recall_scores(archs.get("transformer", {})):
        return _verdict("recall", INCONCLUSIVE, "needs MQAR or selective copying scored for the transformer and an LSTM/GRU")
    att, rnn = recall_scores(archs["transformer"]), recall_scores(archs[rec])
    evidence = "; ".join(f"{task}: transformer {att[task]:.1%}, {rec} {rnn[task]:.1%}" for task in att if task in rnn)
    by_length = [f"{name} {_accuracies(archs[name])}" for name in ("transformer", rec) if "mqar" in archs[name]]
    if by_length:  # (either one's MQAR stage may have failed, the other task scored)
        evidence += f" (MQAR by length: {'; '.join(by_length)})"
    learned = learned_tasks(archs, rec)
    if not learned:
        return _verdict("recall", INCONCLUSIVE, evidence + f"; attention reached {LEARNED:.0%} on no recall task: "
                                                           "the budget is too small to test recall")
    gaps = [att[task] - rnn[task] for task in learned]
    evidence += f"; judged on {', '.join(learned)} (attention above {LEARNED:.0%})"
    if all(gap >= ACCURACY_MARGIN for gap in gaps):
        return _verdict("recall", SUPPORTED, evidence)
    if any(gap < ACCURACY_MARGIN / 2 for gap in gaps):
        return _verdict("recall", NOT_SUPPORTED, evidence)
    return _verdict("recall", INCONCLUSIVE, evidence)


def linear_time(archs):
    candidates = [n for n in LINEAR_TIME if n in archs]  # run, if not necessarily measured (a stage may have failed)
    if not any(archs[n].get("training_speed") for n in candidates):
        return _verdict("linear_time", INCONCLUSIVE, "neither mamba2 nor linear_attention was measured")
    rec = _recurrence(archs)
    rec_exponent = cost_exponent(archs[rec]["training_speed"]) if rec else None
    linear_bound = _linear_bound(archs, rec_exponent)
    # Recall: on every task attention learned, an accuracy closer to attention's than to the recurrence's.
    learned = learned_tasks(archs, rec)
    att, rnn = recall_scores(archs.get("transformer", {})), recall_scores(archs.get(rec or "", {}))
    bars = {task: (att[task] + rnn[task]) / 2 for task in learned}
    parts, winners, but_for_cost, unmeasured = [], [], [], []
    for name in candidates:
        exponent, growth = cost_exponent(archs[name].get("training_speed")), cache_growth(archs[name].get("decode"))
        scores = recall_scores(archs[name])
        if exponent is None or growth is None or any(task not in scores for task in bars):
            parts.append(f"{name}: not fully measured")
            unmeasured.append(name)
            continue
        parts.append(", ".join([f"{name}: time n^{exponent:.2f}", f"state x{growth[0]:.2f} over x{growth[1]:.0f} context",
                                *(f"{task} {acc:.1%}" for task, acc in scores.items())]))
        if growth[0] <= CONSTANT_GROWTH and bars and all(scores[task] >= bar for task, bar in bars.items()):
            (winners if exponent <= linear_bound else but_for_cost).append(name)
    bar = f"linear: time exponent <= {linear_bound:.2f} and constant state"
    if bars:
        bar += "; recall: " + ", ".join(f"{task} >= {value:.1%}" for task, value in bars.items()) + \
               f" (midway between {rec} and transformer)"
    evidence = "; ".join(parts) + f" [{bar}]"
    if winners:
        return _verdict("linear_time", SUPPORTED, evidence + f"; both reached by {', '.join(winners)}")
    if not bars:
        if not att or not rnn:
            missing = "the transformer's" if not att else "an LSTM/GRU's"
            return _verdict("linear_time", INCONCLUSIVE, evidence + f" (recall untestable: needs {missing} recall measured)")
        return _verdict("linear_time", INCONCLUSIVE, evidence + " (recall untestable: attention learned no recall task)")
    if but_for_cost and rec_exponent is not None and linear_bound < rec_exponent:
        return _verdict("linear_time", INCONCLUSIVE, evidence + f" ({', '.join(but_for_cost)}: constant state and recall, "
                                                                f"but linear cost untestable: the transformer's cost "
                                                                f"grows no clearer than the {rec}'s at these lengths)")
    if unmeasured:
        return _verdict("linear_time", INCONCLUSIVE, evidence + " (undecided while a candidate is not fully measured)")
    return _verdict("linear_time", NOT_SUPPORTED, evidence)


def _linear_bound(archs, rec_exponent) -> float:
    """The largest cost exponent a linear-time model may have and count as linear. Relative to a measured LSTM/GRU
    (within the margin of its exponent), as the method itself costs every model some growth (fewer sequences per step
    at longer lengths); but, where the transformer's grows clearly faster than linear, at least the margin below it,
    so that a model that scales like attention is not called linear."""
    bound = max(rec_exponent, 1.0) + EXPONENT_MARGIN if rec_exponent is not None else LINEAR_EXPONENT
    attention_exponent = cost_exponent(archs.get("transformer", {}).get("training_speed"))
    if attention_exponent is not None and attention_exponent > LINEAR_EXPONENT + EXPONENT_MARGIN:
        bound = min(bound, attention_exponent - EXPONENT_MARGIN)
    return bound


def all_verdicts(archs, environment=None) -> list[dict]:
    return [parallel_training(archs, environment)] + [
        check(archs) for check in (quadratic_cost, streaming_memory, recall, linear_time)]


def _exp(value):
    return "?" if value is None else f"{value:.2f}"


def _kib(size):
    return f"{size / 1024:.1f} KiB"


def _accuracies(arch):
    return ", ".join(f"{float(acc):.1%} at {length}" for length, acc in sorted(arch["mqar"]["accuracy"].items(), key=lambda kv: int(kv[0])))
