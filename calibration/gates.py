"""Accuracy gates: a quantized bundle against its FP32 model, as a printed table.

    speech-token cosine   audio tower on calibration windows, candidate vs FP32 (mean; min shown)
    LLM top-1 agreement   the FP32 LLM decodes greedily from an ASR prompt over FP32 speech tokens;
                          the candidate LLM is fed the same tokens (teacher forcing) and must pick
                          the same next token: matches / positions
    WER delta             transcripts, greedy or beam-searched, of a corpus's gate split or the demo
                          eval subset (Whisper normalisation), each
                          quantized stage alone (the other in FP32) and the whole bundle, minus the
                          FP32 WER, in points

Both sides are `Backend`s (runtime.backend), so the FP32 side can be the PyTorch reference or an
fp32 bundle and the candidate any quantized bundle. The WER gate needs eval audio with
transcripts and a model that transcribes: it is skipped, with the reason in the table, when no
eval audio is found, or when the FP32 WER itself is above PROBE_MAX_WER on the first utterances
or MAX_REFERENCE_WER on all of them (a delta on noise means nothing; a random test model shows it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..runtime.errors import FastSLMError
from .evaluation import EvalItem, cosine, jfk_utterance, read_corpus, wer

MAX_REFERENCE_WER = 50.0  # percent: above it the FP32 model does not transcribe and a WER delta is noise
PROBE_ITEMS, PROBE_MAX_WER = 5, 90.0  # checked first, so an untrained model costs 5 transcripts, not 50


class GateError(FastSLMError):
    """A quantized build missed an accuracy gate (and the user did not override it)."""


@dataclass(frozen=True)
class GateThresholds:
    speech_cosine: float = 0.99  # mean cosine of the speech tokens
    top1_int8: float = 0.95  # LLM top-1 agreement, INT8 weights
    top1_int4: float = 0.85  # LLM top-1 agreement, INT4 weights
    wer_audio_int8: float = 0.5  # points of WER the INT8 audio tower may add
    wer_llm_int8: float = 0.5
    wer_llm_int4: float = 2.0

    def top1(self, bits: int) -> float:
        return self.top1_int8 if bits == 8 else self.top1_int4

    def wer_llm(self, bits: int) -> float:
        return self.wer_llm_int8 if bits == 8 else self.wer_llm_int4


@dataclass
class GateRow:
    gate: str
    measured: str
    limit: str
    passed: bool | None  # None: skipped (see note)
    value: float | None = None
    note: str = ""

    @property
    def result(self) -> str:
        return {True: "pass", False: "FAIL", None: "skipped"}[self.passed]


@dataclass
class GateReport:
    title: str
    rows: list[GateRow] = field(default_factory=list)

    @property
    def failed(self) -> list[GateRow]:
        return [r for r in self.rows if r.passed is False]

    def table(self) -> str:
        head = ("gate", "measured", "limit", "result")
        body = [(r.gate, r.measured if r.passed is not None else r.note, r.limit, r.result) for r in self.rows]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(4)]
        lines = [self.title, "  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"title": self.title, "rows": [asdict(r) for r in self.rows], "passed": not self.failed}

    def enforce(self, override: bool, override_flag: str = "--override-gates") -> None:
        """Raise GateError naming every failed gate, unless `override`."""
        if not self.failed or override:
            return
        what = "; ".join(f"{r.gate}: {r.measured} (limit {r.limit})" for r in self.failed)
        raise GateError(f"accuracy gate failed: {what}; nothing was written (pass {override_flag} to write it anyway)")


class MixedBackend:
    """The audio tower of one backend and the LLM of another: attributes each stage's error alone."""

    def __init__(self, audio: Any, llm: Any):
        self.audio, self.llm = audio, llm
        self.name = f"{getattr(audio, 'name', 'audio')}+{getattr(llm, 'name', 'llm')}"
        self.n_mels, self.tokens_per_window = audio.n_mels, audio.tokens_per_window
        self.max_windows_per_batch = audio.max_windows_per_batch
        self.hidden_size, self.max_context = llm.hidden_size, llm.max_context

    def encode_windows(self, mel: np.ndarray) -> np.ndarray:
        return self.audio.encode_windows(mel)

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return self.llm.embed_tokens(ids)

    def empty_cache(self):
        return self.llm.empty_cache()

    def decode(self, embeds: np.ndarray, cache):
        return self.llm.decode(embeds, cache)


# ---------------------------------------------------------------------------------------------
# The measurements


def window_cosines(reference: Any, candidate: Any, windows: np.ndarray) -> np.ndarray:
    """Cosine of the flattened speech tokens of each window."""
    return np.asarray([cosine(reference.encode_windows(w[None]), candidate.encode_windows(w[None])) for w in windows])


def top1_agreement(reference: Any, candidate: Any, tokenizer: Any, speech: Sequence[np.ndarray],
                   max_tokens: int = 32) -> tuple[int, int]:  # fmt: skip
    """(matching positions, positions): the candidate LLM's argmax vs the FP32 LLM's greedy choice.

    `speech` holds one (tokens_per_window, hidden) array per prompt, from the FP32 audio tower,
    so only the LLMs differ. The candidate follows the FP32 choices (teacher forcing).
    """
    from ..runtime.generate import Pipeline

    ids = Pipeline(reference, tokenizer).prompt_ids("transcribe")
    left, right = np.asarray(ids.left, np.int64), np.asarray(ids.right, np.int64)
    stop = set(tokenizer.eos_ids)
    matches = positions = 0
    for tokens in speech:
        caches, logits = [], []
        for backend in (reference, candidate):
            embeds = np.concatenate([backend.embed_tokens(left), tokens, backend.embed_tokens(right)])
            lg, cache = backend.decode(embeds, backend.empty_cache())
            logits.append(lg)
            caches.append(cache)
        for _ in range(max_tokens):
            choice = int(np.argmax(logits[0]))
            matches += int(np.argmax(logits[1]) == choice)
            positions += 1
            if choice in stop:
                break
            for i, backend in enumerate((reference, candidate)):
                logits[i], caches[i] = backend.decode(backend.embed_tokens(np.array([choice], np.int64)), caches[i])
    return matches, positions


GATE_SPLIT = "gate.jsonl"  # a corpus's own gate split (models/demo/corpus.py), apart from every reported set


def eval_items(corpus: Path | None, limit: int) -> tuple[list[EvalItem], str]:
    """The WER subset; ([], why) when there is none.

    A corpus with a gate split gives its first `limit` utterances: a gate that scored the sets a
    model's results are reported on would choose its float layers on them. Otherwise the first
    `limit` eval_seen utterances and jfk.flac (the shipped eval subset's default)."""
    from .data import default_corpus

    if limit <= 0:
        return [], "WER gate off (--wer-items 0)"
    corpus = Path(corpus) if corpus is not None else default_corpus()
    gate = corpus / GATE_SPLIT
    if gate.is_file():
        items = [EvalItem(u.id, u.text, u.path) for u in read_corpus(gate)[:limit] if u.path.is_file()]
        return items, "" if items else f"{gate} lists no recording that exists"
    items: list[EvalItem] = []
    jsonl = corpus / "eval_seen.jsonl"
    if jsonl.is_file():
        items += [EvalItem(u.id, u.text, u.path) for u in read_corpus(jsonl)[: max(limit - 1, 1)]]
        items = [it for it in items if it.audio.is_file()]
    jfk = jfk_utterance()
    if jfk is not None:
        items.append(EvalItem(jfk.id, jfk.text, jfk.path))
    if not items:
        return [], f"no eval audio ({jsonl} is missing and FASTSLM_SHARED_DATA holds no jfk.flac)"
    return items[:limit], ""


def unseen_by_calibration(items: list[EvalItem], sources: list[dict]) -> tuple[list[EvalItem], list[EvalItem]]:
    """(kept, dropped): the WER items whose audio is not among the calibration recordings.

    A gate that scores audio the ranges were measured on reports too small a loss, so such items
    are left out; a recording counts as the same by its resolved path or by its bytes (a copy).
    """
    import hashlib

    def digest(path: Path) -> str | None:
        try:
            return hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            return None

    seen_paths = {Path(s["path"]).resolve() for s in sources if s.get("path")}
    seen_bytes = {d for d in (digest(p) for p in seen_paths) if d}
    kept, dropped = [], []
    for item in items:
        same = Path(item.audio).resolve() in seen_paths or digest(item.audio) in seen_bytes
        (dropped if same else kept).append(item)
    return kept, dropped


# (audio-tower backend, LLM backend, items) -> transcripts: the seam the WER gate runs through.
Transcriber = Callable[[Any, Any, list[EvalItem]], list[str]]


def pipeline_transcriber(tokenizer: Any, max_new_tokens: int = 96, beam_size: int = 1) -> Transcriber:
    """Transcribe through `runtime.generate.Pipeline`, greedily or with a beam search of `beam_size`;
    speech tokens are encoded once per audio backend."""
    from ..runtime.generate import Pipeline
    from ..runtime.sampling import SamplingOptions

    decoding = SamplingOptions(temperature=0.0, max_new_tokens=max_new_tokens, beam_size=beam_size)
    speech: dict[tuple[int, str], Any] = {}  # (audio backend, item id) -> its SpeechTokens

    def tokens(audio: Any, item: EvalItem) -> Any:
        key = (id(audio), item.id)
        if key not in speech:
            speech[key] = Pipeline(audio, tokenizer).encode(str(item.audio))
        return speech[key]

    def transcribe(audio: Any, llm: Any, items: list[EvalItem]) -> list[str]:
        pipe = Pipeline(audio if audio is llm else MixedBackend(audio, llm), tokenizer)
        return [pipe.generate(tokens(audio, it), "transcribe", sampling=decoding).text for it in items]

    return transcribe


# ---------------------------------------------------------------------------------------------
# The gates


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run_gates(
    reference: Any,
    candidate: Any,
    tokenizer: Any,
    *,
    title: str,
    windows: np.ndarray,
    audio_quantized: bool,
    llm_bits: int | None,
    thresholds: GateThresholds = GateThresholds(),
    items: list[EvalItem] | None = None,
    no_wer_reason: str = "",
    top1_prompts: int = 8,
    top1_tokens: int = 32,
    transcriber: Transcriber | None = None,
    fp32_transcripts: dict[str, str] | None = None,
    beam_size: int = 1,
    log: Callable[[str], None] = lambda line: None,
) -> GateReport:
    """Every gate that applies: the audio tower's if it is quantized, the LLM's if its weights are.

    `fp32_transcripts` (item id -> the reference's transcript) is filled as the reference is
    transcribed; pass the same dict to gate again with the same reference and items (the exporter's
    rounds with more float layers) and the reference's transcripts are not made again. The WER gates
    decode with a beam search of `beam_size` (1: greedy) unless a `transcriber` is given."""
    report = GateReport(title)
    t = thresholds
    if audio_quantized:
        log("gates: speech-token cosine")
        cos = window_cosines(reference, candidate, windows)
        mean = float(cos.mean())
        report.rows.append(GateRow(f"speech-token cosine ({_count(len(cos), 'window')})", f"{mean:.5f} (min {cos.min():.5f})",
                                   f">= {t.speech_cosine}", mean >= t.speech_cosine, mean))  # fmt: skip
    if llm_bits:
        log("gates: LLM top-1 agreement")
        chosen = windows[np.linspace(0, len(windows) - 1, min(top1_prompts, len(windows))).astype(int)]
        speech = list(reference.encode_windows(chosen))
        matches, positions = top1_agreement(reference, candidate, tokenizer, speech, top1_tokens)
        rate = matches / max(positions, 1)
        limit = t.top1(llm_bits)
        report.rows.append(GateRow(f"LLM top-1 agreement, INT{llm_bits} weights ({_count(len(speech), 'prompt')})",
                                   f"{100 * rate:.1f}% of {positions} positions", f">= {100 * limit:g}%",
                                   rate >= limit, rate))  # fmt: skip
    report.rows += wer_rows(reference, candidate, audio_quantized, llm_bits, t, items or [], no_wer_reason,
                            transcriber or pipeline_transcriber(tokenizer, beam_size=beam_size), log, fp32_transcripts)  # fmt: skip
    return report


def wer_rows(reference: Any, candidate: Any, audio_quantized: bool, llm_bits: int | None, t: GateThresholds,
             items: list[EvalItem], no_wer_reason: str, transcribe: Transcriber,
             log: Callable[[str], None] = lambda line: None,
             fp32_transcripts: dict[str, str] | None = None) -> list[GateRow]:  # fmt: skip
    """WER of each quantized stage alone and of the whole candidate, against the FP32 WER
    (`fp32_transcripts`: see run_gates)."""
    stages = []  # (label, audio backend, LLM backend, limit)
    if audio_quantized:
        stages.append(("WER, INT8 audio tower + FP32 LLM", candidate, reference, t.wer_audio_int8))
    if llm_bits:
        stages.append((f"WER, FP32 audio tower + INT{llm_bits} LLM", reference, candidate, t.wer_llm(llm_bits)))
    if len(stages) == 2:
        stages.append(("WER, whole bundle", candidate, candidate, stages[0][3] + stages[1][3]))

    def skipped(reason: str) -> list[GateRow]:
        return [GateRow(label, "", f"<= +{limit:g} pt", None, note=f"skipped: {reason}") for label, _, _, limit in stages]

    if not items:
        return skipped(no_wer_reason or "no eval audio")
    try:
        import jiwer  # noqa: F401
        import whisper_normalizer  # noqa: F401
    except ImportError:
        return skipped("needs jiwer and whisper-normalizer (pip install jiwer whisper-normalizer)")
    refs = [it.text for it in items]
    known = {} if fp32_transcripts is None else fp32_transcripts

    def fp32(subset: list[EvalItem]) -> list[str]:
        todo = [it for it in subset if it.id not in known]
        if todo:
            log(f"gates: FP32 transcripts of {len(todo)} utterances")
            known.update(zip((it.id for it in todo), transcribe(reference, reference, todo)))
        return [known[it.id] for it in subset]

    # A model that does not transcribe (an untrained one) shows it on a few utterances already.
    probe = items[:PROBE_ITEMS]
    probe_wer = wer(refs[: len(probe)], fp32(probe))
    if len(items) > len(probe) and math.isfinite(probe_wer) and probe_wer > PROBE_MAX_WER:
        return skipped(f"FP32 WER {probe_wer:.0f}% on the first {len(probe)} utterances: the model does not transcribe yet")
    base = wer(refs, fp32(items))  # the probe's transcripts are the first of them
    if not math.isfinite(base) or base > MAX_REFERENCE_WER:
        return skipped(f"FP32 WER {base:.1f}% on {len(items)} utterances: the model does not transcribe yet")
    rows = []
    for label, audio, llm, limit in stages:
        log(f"gates: {label}")
        got = wer(refs, transcribe(audio, llm, items))
        delta = got - base
        rows.append(GateRow(f"{label} ({len(items)} utt.)", f"{got:.2f}% vs {base:.2f}% ({delta:+.2f} pt)",
                            f"<= +{limit:g} pt", delta <= limit + 1e-9, delta))  # fmt: skip
    return rows
