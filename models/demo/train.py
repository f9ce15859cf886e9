"""Training of the demo FastSLM on precomputed encoder features: HFQ-Former + Qwen3 decoder.

The Whisper encoder is frozen, so one training step starts from its stored output:

    features (B, 1500, D) --HFQ-Former--> speech (B, 50, H)
    inputs_embeds = embed(left ids) + speech + embed(right ids) + embed(answer ids + <|im_end|>)
    loss = cross-entropy on the answer tokens and <|im_end|> only
         + align_weight * slot loss(speech tokens, read through the decoder's embedding table)

With `tune_encoder_blocks` N the stored features are the input of the encoder's last N blocks,
which train with the rest (features --last N blocks, ln_post--> --HFQ-Former--> speech).

The slot loss is training-only scaffolding (its head is not part of the model). A decoder
trained from scratch first learns the language prior, and the LLM loss alone gives the
HFQ-Former almost no signal about what each speech token should hold, so transcripts stay
fluent and unrelated to the audio (measured: 2,300 steps at ~100% WER; a CTC term on the
speech tokens stayed on its blank plateau for 700 steps). But the recipe composed every
window itself, so it knows when each utterance starts and ends; spreading an utterance's
tokens over its span in proportion to their characters gives each speech token (0.6 s of
the window at FastSLM's 50 per window) the text tokens spoken in its slot, approximately. The slot loss
scores each speech token against the decoder's embedding table (see SlotHead) with those
tokens as the target (uniform over the slot's tokens; "nothing" for silent slots,
down-weighted): a dense target with no alignment to search for, which puts word identity
into each speech token from the first steps.

which is the sequence `fastslm.runtime.generate.Pipeline.prefill` builds at inference, plus the
answer (prompt ids from `build_prompt` + `Tokenizer.encode_prompt`, positions 0..T-1). Samples
of a batch are right-padded; padding comes after every real position, so the causal mask
keeps it out of the real ones, and it carries no loss.

Reproducible and resumable: the initial weights come from the seed, and everything random in
step s (which windows, which example of each window, the feature masks) is drawn from a
generator seeded with (seed, s). A checkpoint (tmp file + rename) holds the trainable
weights, the AdamW state, the step, the RNG states and the schedule, so a killed run restarts
from its last checkpoint and continues exactly as the uninterrupted run would have.

Schedule: linear warmup, cosine decay to `min_lr_ratio * lr`. Without `steps`, the first
`calibrate_steps` steps are timed and the schedule is sized to fill `hours` (stored in the
checkpoint, so resumes keep it). Every `eval_minutes` (converted to steps at calibration) the
model is evaluated on held-out utterances through the runtime's Pipeline and the best
weights by greedy WER are kept in ``best.pt``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ...runtime.audio import SAMPLE_RATE, WINDOW_SAMPLES
from ...runtime.prompt import IM_END, Task, build_prompt, resolve_task, thinking_reply
from ...runtime.tokenizer import Tokenizer
from ..fastslm import FastSLM, FastSLMConfig
from ..hfq_former import HFQFormer
from ..whisper_encoder import sinusoids
from . import tasks
from .features import FeatureStore, check_tuned_top_blocks, encoder_output
from .windows import RecipeError, WindowOptions

SLOT_TIMINGS = ("chars", "whisper")
FRAME_SAMPLES = 320  # audio samples per encoder output frame (16 kHz, 50 frames a second)
STATE_FILE = "state.pt"
BEST_FILE = "best.pt"
LOG_FILE = "log.jsonl"


@dataclass(frozen=True)
class TrainOptions:
    seed: int = 0
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 300
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    steps: int | None = None  # total schedule length; None: sized from `hours` after calibration
    hours: float = 2.5
    calibrate_steps: int = 20
    qa_prob: float = 0.5  # a window with questions trains on one of them with this probability, else ASR
    qa_weight: float = 1.0  # loss weight of a QA answer token relative to an ASR token
    # feature-level SpecAugment (on the encoder output): per sample, with augment_prob
    augment_prob: float = 0.5
    time_masks: int = 2
    time_mask_frames: int = 20  # 50 frames = 1 s
    channel_mask: int = 24  # widest channel mask
    channel_masks: int = 1
    mask_speech_only: bool = False  # time masks inside the window's audio, not over the whole 30 s
    checkpoint_minutes: float = 5.0
    eval_minutes: float = 20.0  # 0: no periodic evaluation
    eval_every: int | None = None  # steps; None: from eval_minutes at calibration
    max_new_tokens: int = 200
    bf16: bool = False  # autocast the step to bfloat16 (faster on AVX512-BF16 CPUs)
    log_every: int = 10
    align_weight: float = 1.0  # slot loss weight; 0: the LLM loss only
    silent_slot_weight: float = 0.2  # weight of a slot with no text in the slot loss
    reading_batch: int = 0  # text-only ASR samples per step on pseudo speech tokens (see reading_loss)
    reading_qa: int = 0  # text-only question samples per step, own loss term (Trainer.reading_questions_for)
    # (step, count) pairs: from each step on, `count` reading question samples per step instead of reading_qa
    reading_qa_from: tuple[tuple[int, int], ...] = ()
    qa_from: int = 0  # step where the question levers (reading_qa, qa_weight) start; see question_share
    qa_think_from: int | None = None  # step from which answers to questions reason first; see thinks_at
    ctc_weight: float = 0.0  # CTC on the slot head's posteriors (blank: "nothing said"); see slot_ctc_loss
    slot_timing: str = "chars"  # when each token was said: "chars" (spread by length) or "whisper" (aligned)
    # checkpoint selection: best = lowest WER + select_qa_weight * (100 - QA accuracy), both in percent
    select_qa_weight: float = 0.0
    # an exponential moving average of the weights from step ema_from on (0: none); every evaluation
    # from then scores it beside the raw weights and either can become the best checkpoint
    ema_decay: float = 0.0
    ema_from: int = 0
    # (step, peak lr) pairs: at each step the learning rate warms up again to its peak and follows a new
    # cosine down to the floor at the next restart (or the end); the first cosine ends at the first restart
    lr_restarts: tuple[tuple[int, float], ...] = ()
    # (step, ((question type, weight), ...)) pairs: from each step on, reading questions draw their type
    # with these weights (types not named weigh 1) instead of uniformly; see Trainer.reading_questions_for
    reading_qa_types_from: tuple[tuple[int, tuple[tuple[str, float], ...]], ...] = ()
    summary_scratch_from: int | None = None  # step from which a summary's thinking lists its words; see thinking_for
    # the encoder's last N blocks and ln_post train too (the features hold their input), their
    # learning rate scaled by encoder_lr_scale: pretrained weights move less than new ones
    tune_encoder_blocks: int = 0
    encoder_lr_scale: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "reading_qa_from", tuple(sorted((int(a), int(n)) for a, n in self.reading_qa_from)))
        object.__setattr__(self, "lr_restarts", tuple(sorted((int(a), float(lr)) for a, lr in self.lr_restarts)))
        object.__setattr__(self, "reading_qa_types_from", tuple(sorted(
            (int(a), tuple(sorted((str(t), float(w)) for t, w in dict(weights).items())))
            for a, weights in self.reading_qa_types_from)))
        for a, lr in self.lr_restarts:
            if a <= self.warmup_steps or lr <= 0 or (self.steps is not None and a >= self.steps):
                raise ValueError(f"a learning-rate restart needs a step after warmup ({self.warmup_steps}) and before "
                                 f"the end ({self.steps}) and a peak above 0; got step {a}, peak {lr}")
        for a, weights in self.reading_qa_types_from:
            unknown = {t for t, _ in weights} - set(tasks.QUESTION_TYPES)
            if unknown or any(w < 0 for _, w in weights) or not any(
                    dict(weights).get(t, 1.0) > 0 for t in tasks.QUESTION_TYPES):
                raise ValueError(f"reading question weights at step {a} name the types {tasks.QUESTION_TYPES} with weights "
                                 f">= 0, not all 0; got {dict(weights)}")
        if self.slot_timing not in SLOT_TIMINGS:
            raise ValueError(f"slot_timing must be one of {SLOT_TIMINGS}, got {self.slot_timing!r}")
        if self.steps is None and self.calibrate_steps >= self.warmup_steps:
            raise ValueError("calibrate_steps must be below warmup_steps: the schedule is sized during warmup")
        if self.tune_encoder_blocks < 0 or self.encoder_lr_scale <= 0:
            raise ValueError(f"tune_encoder_blocks must be >= 0 and encoder_lr_scale > 0; got "
                             f"{self.tune_encoder_blocks}, {self.encoder_lr_scale}")
        if not 0.0 <= self.ema_decay < 1.0 or self.ema_from < 0:
            raise ValueError(f"ema_decay must be in [0, 1) and ema_from a step; got {self.ema_decay}, {self.ema_from}")

    # options that change the trajectory: a resume must use the same ones
    def trajectory_key(self) -> dict:
        d = asdict(self)
        for k in ("steps", "hours", "calibrate_steps", "checkpoint_minutes", "eval_minutes", "eval_every",
                  "max_new_tokens", "log_every", "select_qa_weight", "ema_decay", "ema_from"):
            d.pop(k)
        for k, off in _LATER_OPTIONS.items():  # absent from older checkpoints: only a change counts
            if d[k] == off:
                d.pop(k)
        return d


# Options added after runs were started, with the value that leaves a run as it was.
_LATER_OPTIONS = {"reading_batch": 0, "ctc_weight": 0.0, "slot_timing": "chars", "channel_masks": 1,
                  "mask_speech_only": False, "reading_qa": 0, "qa_from": 0, "qa_think_from": None,
                  "reading_qa_from": (), "lr_restarts": (), "reading_qa_types_from": (),
                  "summary_scratch_from": None, "tune_encoder_blocks": 0, "encoder_lr_scale": 0.1}
# Options that act only from the step they name: a run that has reached none of the steps a
# checkpoint and a resume give may resume with another (the steps before are the same either way).
_FROM_STEP_OPTIONS = ("qa_think_from", "summary_scratch_from")
# (step, value) schedules: a resume may change the entries whose step the run has not reached.
_SCHEDULE_OPTIONS = ("reading_qa_from", "lr_restarts", "reading_qa_types_from")


def same_trajectory(saved: dict, current: dict, step: int) -> bool:
    """Whether a checkpoint at `step` written with options `saved` resumes under `current` (trajectory keys)."""
    saved, current = dict(saved), dict(current)
    for k in _FROM_STEP_OPTIONS:
        if all(d.get(k) is None or d[k] >= step for d in (saved, current)):
            saved.pop(k, None)
            current.pop(k, None)
    for k in _SCHEDULE_OPTIONS:
        reached = [tuple((a, n) for a, n in d.pop(k, ()) if a < step) for d in (saved, current)]
        if reached[0] != reached[1]:
            return False
    return saved == current


def reading_questions_at(step: int, o: TrainOptions) -> int:
    """Reading question samples at `step`: reading_qa, or the last reading_qa_from entry the step has reached.

    Measured at step 4,400 of the issue-20 run, 1,200 steps into thinking: given text-made speech
    tokens, which it transcribes at 5.8% WER, the decoder still named the last word only 57.5% of
    the time and gave the three-word summary 35%: reading its own thinking is the skill short of
    examples (about 0.6 questions of each type a step came from audio, 1.6 from reading).
    """
    return next((n for a, n in reversed(o.reading_qa_from) if step >= a), o.reading_qa)


def reading_question_weights_at(step: int, o: TrainOptions) -> dict[str, float] | None:
    """The question-type weights of reading questions at `step` (None: uniform), from o.reading_qa_types_from.

    Measured on run 4's step-6,000 average (60 eval_seen utterances, `<think>` then answer): the
    summary rule applied to its own thinking would be right 46.7% of the time, its answer was 18.3%
    (count 68.3% against 51.7%; first, last and contains within 5 points): reading the summary out of
    a transcript it has just written is the skill short of practice, not hearing the words.
    """
    return next((dict(w) for a, w in reversed(o.reading_qa_types_from) if step >= a), None)


# Steps over which the question levers ramp from nothing to full weight after TrainOptions.qa_from.
QA_RAMP_STEPS = 500


def question_share(step: int, o: TrainOptions) -> float:
    """How much of the question levers applies at `step`: 0 before `qa_from`, then a linear ramp to 1.

    Measured on the issue-20 runs: with both levers from step 0 the decoder learned to transcribe
    about 1.7x slower (held-out WER 75.6% at step 1,200 against 54.6% without them); the answers'
    form is learned within a few hundred steps, so the questions wait until transcripts are read.
    """
    if step < o.qa_from:
        return 0.0
    return 1.0 if not o.qa_from else min(1.0, (step - o.qa_from + 1) / QA_RAMP_STEPS)


def thinks_at(step: int, o: TrainOptions) -> bool:
    """Whether question answers at `step` reason first: `<think>` transcript `</think>`, then the answer.

    Measured at step 2,800 of the issue-20 run: answered straight from the speech tokens, count
    questions got 0% ("11" or "13" to every one) and last-word ones 7.5%, while the same rules
    applied to the model's own transcripts of those utterances gave about 52% and 60%. Every
    question type is a function of the transcript, so the decoder writes it out first (Qwen3's
    thinking format; the runtime keeps the block out of the answer, Tokenizer.split_thinking).
    """
    return o.qa_think_from is not None and step >= o.qa_think_from


def thinking_for(question: str, transcript: str, step: int, o: TrainOptions) -> str:
    """What a question's answer reasons over at `step`: the transcript, and for a three-word summary
    from o.summary_scratch_from on, a second line with its distinct non-stopwords in spoken order.

    The summary is the one answer that is a selection, not a copy: run 4's answers matched the rule
    applied to their own thinking 21.7% of the time (first word 88%, last 65%). Written out word by
    word, the selection becomes a filter decided on one word at a time, and the answer its first
    three words (the rule's fill-up for shorter lists still reads the transcript above).
    """
    if o.summary_scratch_from is not None and step >= o.summary_scratch_from \
            and tasks.question_type(question) == "summary":
        return f"{transcript}\n{' '.join(tasks.content_words(transcript))}"
    return transcript


# Steps over which a learning-rate restart climbs from the floor back to its peak.
RESTART_WARMUP_STEPS = 200


def learning_rate(step: int, total: int | None, o: TrainOptions) -> float:
    """Linear warmup, then a cosine to the floor (lr x min_lr_ratio), once per cycle of `o.lr_restarts`.

    Every step before the first restart follows, to the bit, the single cosine of a run whose schedule
    ends at that restart, so a run given restarts repeats such a run exactly up to it. A restart climbs
    from the floor to its peak over RESTART_WARMUP_STEPS, then follows its own cosine (SGDR-style).
    """
    if step < o.warmup_steps or total is None:
        return o.lr * min(1.0, (step + 1) / o.warmup_steps)
    reached = [(a, peak) for a, peak in o.lr_restarts if step >= a]
    if not reached:
        end = o.lr_restarts[0][0] if o.lr_restarts else total
        progress = min(1.0, (step - o.warmup_steps) / max(1, end - o.warmup_steps))
        return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    start, peak = reached[-1]
    end = next((a for a, _ in o.lr_restarts if a > start), total)
    floor = o.lr * o.min_lr_ratio
    if step < start + RESTART_WARMUP_STEPS:
        return floor + (peak - floor) * (step - start + 1) / RESTART_WARMUP_STEPS
    progress = min(1.0, (step - start - RESTART_WARMUP_STEPS) / max(1, end - start - RESTART_WARMUP_STEPS))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def init_llm_(model: FastSLM, seed: int) -> None:
    """GPT-style init of the decoder trained from scratch: N(0, 0.02), residual outputs scaled down."""
    g = torch.Generator().manual_seed(seed)
    n_layers = model.config.qwen3.num_layers
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if p.dim() < 2:
                continue
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            p.copy_(torch.randn(p.shape, generator=g) * std)


def init_time_local_queries_(hfq_former: HFQFormer, sharpness: float = 2.0) -> None:
    """Start every compressor query on its own stretch of the window.

    A compressor scores query i against frame j with (LN(query_i) + pos_Q(i)) . (LN(x_j) + pos_N(j))
    and has no projections to learn a remapping, so with random queries the pos_Q(i) . pos_N(j)
    term dominates and query i attends to frame i: all 80 first-stage queries read the first
    1.6 s of a 30 s window (measured on tiny.en features). Setting query_i = pos_N(c_i) - pos_Q(i),
    with c_i the centre of the i-th equal slice, puts the attention peak at c_i instead. The
    final compressor reads the stage tokens, whose first third is compressor1's time-ordered
    tokens, so its slices are taken there.

    `sharpness` scales LN_q's gain (and divides the pos_Q correction to match): at 1 a query
    still spreads 70% of its attention over the whole window, so every speech token carries
    the same average and nothing can be read from it; at 2, four of the six heads (the
    high-frequency ones) keep ~90% of their mass within 0.6 s of the centre, and the two
    lowest-frequency heads stay global.
    """
    d = hfq_former.dims
    slices = list(zip((hfq_former.compressor1, hfq_former.compressor2, hfq_former.compressor3), d.stage_queries, d.stage_frames))
    slices.append((hfq_former.compressor, d.n_queries, d.stage_queries[0]))
    with torch.no_grad():
        for compressor, n_queries, span in slices:
            n_ctx = compressor.kv_pos_embeds.shape[0]
            centres = ((torch.arange(n_queries) + 0.5) * span / n_queries).long()
            target = sinusoids(n_ctx, d.width)[centres] - sinusoids(n_queries, d.width) / sharpness
            compressor.query.copy_(target.unsqueeze(0))
            compressor.q_ln.weight.fill_(sharpness)


def init_hfq_former_outputs_(hfq_former: HFQFormer) -> None:
    """out_attn blocks start as the identity and speech tokens at the scale of text embeddings.

    With default init the two out_attn blocks add a near-global average to every token (the
    token-to-token cosine of the speech tokens rises from 0.65 to 0.83 on tiny.en features), and
    llm_proj outputs RMS ~0.33 against 0.02 for the decoder's embeddings, so in the decoder's
    residual stream the speech positions start out 16x louder than any text. Zeroed output
    projections (trained from there) and a small llm_proj remove both.
    """
    with torch.no_grad():
        for block in hfq_former.out_attn:
            for attention in (block.attn, block.cross_attn):
                attention.out_proj.weight.zero_()
                attention.out_proj.bias.zero_()
        g = torch.Generator().manual_seed(hfq_former.dims.width)
        proj = hfq_former.llm_proj
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * (0.05 / math.sqrt(proj.in_features)))
        proj.bias.zero_()


def new_model(config: FastSLMConfig, seed: int, whisper: torch.nn.Module | None = None,
              tune_encoder_blocks: int = 0) -> FastSLM:
    """A FastSLM with seeded random HFQ-Former and decoder and (if given) the pretrained encoder,
    frozen but for its last `tune_encoder_blocks` blocks and ln_post."""
    check_tuned_top_blocks(tune_encoder_blocks, config.whisper.n_layers)
    torch.manual_seed(seed)
    model = FastSLM(config)
    init_llm_(model, seed)
    init_time_local_queries_(model.audio_tower.hfq_former)
    init_hfq_former_outputs_(model.audio_tower.hfq_former)
    encoder = model.audio_tower.whisper
    if whisper is not None:
        encoder.load_state_dict(whisper.state_dict())
    encoder.requires_grad_(False)
    if tune_encoder_blocks:
        encoder.blocks[-tune_encoder_blocks:].requires_grad_(True)
        encoder.ln_post.requires_grad_(True)
    return model


def speech_from_features(model: FastSLM, features: Tensor, tuned_top_blocks: int = 0) -> Tensor:
    """Speech tokens (B, Q, H) of stored features: the encoder's output, or with `tuned_top_blocks`
    N the input of its last N blocks, which run here (features.py)."""
    return model.audio_tower.hfq_former(encoder_output(model.audio_tower.whisper, features, tuned_top_blocks))


def trainable_parameters(model: FastSLM) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state(model: FastSLM) -> dict:
    clone = lambda sd: {k: v.detach().clone() for k, v in sd.items()}  # noqa: E731
    state = {"hfq_former": clone(model.audio_tower.hfq_former.state_dict()), "llm": clone(model.llm.state_dict())}
    tuned = {k: p for k, p in model.audio_tower.whisper.named_parameters() if p.requires_grad}
    if tuned:  # the encoder's tuned top; the frozen rest is the pretrained encoder's
        state["whisper"] = clone(tuned)
    return state


def load_trainable_state(model: FastSLM, state: dict) -> None:
    # States saved before the HFQ-Former had one name call it "adapter" (same keys below it).
    model.audio_tower.hfq_former.load_state_dict(state["hfq_former"] if "hfq_former" in state else state["adapter"])
    model.llm.load_state_dict(state["llm"])
    if "whisper" in state:
        unexpected = model.audio_tower.whisper.load_state_dict(state["whisper"], strict=False).unexpected_keys
        if unexpected:
            raise RecipeError(f"the checkpoint's encoder weights {unexpected[:3]} do not fit this model's encoder")


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    features: Tensor | None  # (B, frames, D) float32; None for reading batches
    ids: Tensor  # (B, T) int64; speech positions hold 0
    speech_start: list[int]  # per sample: index of the first speech token
    targets: Tensor  # (B, T) int64: the token at that position where it carries loss, else -100
    weights: Tensor  # (B, T) float32 loss weights at the target positions
    slots: Tensor | None = None  # (B, Q, V + 1) target distribution per speech token (V: nothing said)
    slot_weights: Tensor | None = None  # (B, Q)
    sequences: list[list[int]] | None = None  # per sample: the text tokens of the window in spoken order
    windows: list[int] = field(default_factory=list)


class Examples:
    """Turns (window, example) pairs into token ids, with the prompt ids cached per instruction."""

    def __init__(self, tokenizer: Tokenizer, tokens_per_window: int):
        self.tok = tokenizer
        self.q = tokens_per_window
        self.im_end = tokenizer.token_id(IM_END)
        self._prompts: dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def prompt(self, task: str, instruction: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        key = (task, instruction)
        if key not in self._prompts:
            ids = self.tok.encode_prompt(build_prompt(Task[task], instruction))
            self._prompts[key] = (ids.left, ids.right)
        return self._prompts[key]

    def sequence(self, example: dict) -> tuple[list[int], int, int, int]:
        """(ids with zeros at the speech positions, speech start, index of the first reply id, index of
        the first answer id after the reply's thinking); an example with "thinking" reasons first."""
        left, right = self.prompt(example["task"], example["instruction"])
        thinking = self.tok.encode(thinking_reply(example["thinking"], "")) if "thinking" in example else []
        answer = self.tok.encode(example["answer"]) + [self.im_end]
        prefix = list(left) + [0] * self.q + list(right)
        return prefix + thinking + answer, len(left), len(prefix), len(prefix) + len(thinking)

    def batch(self, features: np.ndarray | None, examples: list[dict], qa_weight: float) -> Batch:
        """Token ids, targets and loss weights of `examples`, with their features (None: supplied later).
        A question's answer weighs `qa_weight`; transcripts, its thinking included, weigh 1."""
        seqs = [self.sequence(e) for e in examples]
        T = max(len(s) for s, _, _, _ in seqs)
        B = len(seqs)
        ids = torch.zeros(B, T, dtype=torch.int64)
        targets = torch.full((B, T), -100, dtype=torch.int64)
        weights = torch.zeros(B, T)
        for b, ((seq, _, reply_at, answer_at), ex) in enumerate(zip(seqs, examples)):
            ids[b, : len(seq)] = torch.tensor(seq)
            targets[b, reply_at : len(seq)] = torch.tensor(seq[reply_at:])
            weights[b, reply_at : answer_at] = 1.0
            weights[b, answer_at : len(seq)] = 1.0 if ex["task"] == "ASR" else qa_weight
        feats = torch.from_numpy(np.asarray(features, dtype=np.float32)) if features is not None else None
        return Batch(feats, ids, [s for _, s, _, _ in seqs], targets, weights)


def spec_augment_(features: Tensor, rng: np.random.Generator, o: TrainOptions,
                  speech_frames: list[int] | None = None) -> None:
    """In place: time masks (whole frames) and channel masks, filled with the window's mean frame.

    With `mask_speech_only`, time masks fall inside each window's audio (`speech_frames`, 50 per
    second): spread over the whole 30 s, most of them would hide padding of a short window.
    """
    B, T, D = features.shape
    for b in range(B):
        if rng.random() >= o.augment_prob:
            continue
        fill = features[b].mean(dim=0)  # (D,)
        span = min(T, max(1, speech_frames[b])) if o.mask_speech_only and speech_frames is not None else T
        for _ in range(o.time_masks):
            width = min(span, int(rng.integers(0, o.time_mask_frames + 1)))
            start = int(rng.integers(0, span - width + 1))
            features[b, start : start + width] = fill
        for _ in range(o.channel_masks):
            width = int(rng.integers(0, o.channel_mask + 1))
            start = int(rng.integers(0, D - width + 1))
            features[b, :, start : start + width] = fill[start : start + width]


def token_slots(window: dict, utterances: dict, tokenizer: Tokenizer, n_slots: int,
                margin_s: float = 0.1, times: list[float] | None = None) -> list[tuple[int, int]]:
    """(slot, token id) for each text token of a window, by where in time it was (probably) said.

    With `times` (each token's centre in seconds, from alignment.py) slot = time // (30 s /
    n_slots). Without, an utterance's tokens are spread over its span (less `margin_s` of
    synthesis silence at each end) in proportion to their lengths in characters.
    """
    slot_s = WINDOW_SAMPLES / SAMPLE_RATE / n_slots
    if times is not None:
        ids = [i for uid in window["utts"] for i in tokenizer.encode(utterances[uid].text.strip())]
        if len(ids) != len(times):
            raise RecipeError(f"window {window.get('id')}: {len(times)} aligned times for {len(ids)} tokens: "
                              "rerun the align stage")
        return [(min(n_slots - 1, int(t / slot_s)), i) for t, i in zip(times, ids)]
    out, start = [], 0.0
    for k, uid in enumerate(window["utts"]):
        if k:
            start += window["gaps"][k - 1] / SAMPLE_RATE
        utt = utterances[uid]
        ids = tokenizer.encode(utt.text.strip())
        lengths = np.array([max(1, len(tokenizer.decode([i]))) for i in ids], dtype=np.float64)
        centres = (np.cumsum(lengths) - lengths / 2) / lengths.sum()
        span = max(utt.seconds - 2 * margin_s, 0.05)
        for i, c in zip(ids, centres):
            out.append((min(n_slots - 1, int((start + margin_s + c * span) / slot_s)), i))
        start += utt.seconds
    return out


class SlotHead(nn.Module):
    """Training-only: each speech token read through the decoder's own embedding table.

    Logits are scaled cosines between a speech token (as the LLM receives it) and every row of
    the tied embedding table, plus a learned "nothing said" row. Sharing the table makes the
    slot loss pull each speech token towards the embeddings of the words spoken in its slot,
    so the decoder receives something close to the text itself, and learning to copy from
    context is the first thing a small decoder learns (measured here: a separate linear head
    taught the HFQ-Former words, yet the decoder still ignored the audio after 700 steps).
    """

    def __init__(self, dim: int, vocab_size: int, seed: int):
        super().__init__()
        self.nothing = vocab_size
        g = torch.Generator().manual_seed(seed)
        self.silence = nn.Parameter(torch.randn(dim, generator=g) * 0.02)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, speech: Tensor, embeddings: Tensor) -> Tensor:
        table = F.normalize(torch.cat([embeddings, self.silence[None]]).float(), dim=-1)  # (V + 1, H)
        cosines = F.normalize(speech.float(), dim=-1) @ table.T  # (B, Q, V + 1)
        return (self.log_scale.exp() * cosines).log_softmax(-1)


def slot_targets(slots: list[list[tuple[int, int]]], n_slots: int, vocab_size: int,
                 silent_weight: float) -> tuple[Tensor, Tensor]:
    """(B, Q, V + 1) target distributions and (B, Q) weights from token_slots of each sample."""
    targets = torch.zeros(len(slots), n_slots, vocab_size + 1)
    for b, pairs in enumerate(slots):
        for slot, token in pairs:
            targets[b, slot, token] += 1.0
    said = targets.sum(-1) > 0
    targets[~said, vocab_size] = 1.0
    targets /= targets.sum(-1, keepdim=True)
    return targets, torch.where(said, 1.0, silent_weight)


def slot_cross_entropy(log_probs: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    ce = -(targets * log_probs).sum(-1)  # (B, Q)
    return (ce * weights).sum() / weights.sum()


def slot_ctc_loss(log_probs: Tensor, sequences: list[list[int]], blank: int) -> Tensor:
    """CTC of each window's token sequence over its speech tokens, read through the slot head.

    The slot targets place tokens by character length, which at 0.2 s per slot is often a slot
    or two off; CTC lets each token find its own slot, in order. It needs a slot per token (and
    one between repeats), which 50 slots per 30 s never give (a window says up to ~120 tokens:
    measured, CTC on 50 tokens stayed on the blank plateau); windows too dense for their slots
    contribute nothing (zero_infinity).
    """
    lengths = torch.tensor([len(q) for q in sequences])
    flat = torch.tensor([t for q in sequences for t in q], dtype=torch.long)
    b, n_slots, _ = log_probs.shape
    return F.ctc_loss(log_probs.float().transpose(0, 1), flat, torch.full((b,), n_slots), lengths, blank=blank,
                      reduction="mean", zero_infinity=True)


def answer_loss(model: FastSLM, speech: Tensor, batch: Batch) -> Tensor:
    """Weighted mean cross-entropy of the answers, with `speech` spliced in at each sample's speech start."""
    q = model.config.tokens_per_window
    text = model.llm.embed(batch.ids)  # (B, T, H)
    rows = [torch.cat([text[b, :s], speech[b].to(text.dtype), text[b, s + q :]]) for b, s in enumerate(batch.speech_start)]
    logits = model.llm(inputs_embeds=torch.stack(rows)).logits  # (B, T, V) float32
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch.targets[:, 1:], reduction="none")  # (B, T-1)
    w = batch.weights[:, 1:]
    return (ce * w).sum() / w.sum()


# ---------------------------------------------------------------------------------------------
# Reading batches: the decoder learns to copy from slots on text alone


def reading_window(texts: list[str], rng: np.random.Generator, single_fraction: float = 0.3,
                   chars_per_s: tuple[float, float] = (12.0, 21.0),
                   longest: float | None = None) -> tuple[dict, dict]:
    """A made-up window of training sentences on a timeline: (window spec, id -> Utterance).

    Durations come from a speaking rate drawn per window (the corpus spans 12-21 characters per
    second, silences included); gaps and lengths follow the composition of the real windows.
    `longest` (seconds) caps the window, as the real windows that carry questions are capped.
    """
    from .windows import Utterance

    rate = rng.uniform(*chars_per_s)
    limit = min(WINDOW_SAMPLES / SAMPLE_RATE, longest or math.inf)
    utts, gaps, total = [], [], 0.0
    target = 0.0 if rng.random() < single_fraction else rng.uniform(min(10.0, limit / 2), limit)
    while True:
        text = texts[int(rng.integers(len(texts)))]
        seconds = len(text) / rate + 0.2
        gap = rng.uniform(0.1, 0.8) if utts else 0.0
        if utts and (total >= target or total + gap + seconds > limit):
            break
        if not utts and seconds > limit:
            continue
        if utts:
            gaps.append(int(gap * SAMPLE_RATE))
        utts.append(Utterance(f"r{len(utts)}", text, seconds, Path()))
        total += gap + seconds
        if target == 0.0:
            break
    window = {"utts": [u.id for u in utts], "gaps": gaps, "text": " ".join(u.text for u in utts)}
    return window, {u.id: u for u in utts}


def pseudo_speech(slots: list[list[tuple[int, int]]], embeddings: Tensor, silence: Tensor, n_slots: int,
                  norm: Tensor) -> Tensor:
    """(B, Q, H) speech tokens made from text: per slot the direction of the sum of its tokens'
    embeddings (the slot head's "nothing said" row where the slot is empty), at length `norm`."""
    rows = []
    for pairs in slots:
        sums = torch.zeros(n_slots, embeddings.shape[1], dtype=embeddings.dtype)
        if pairs:
            where = torch.tensor([s for s, _ in pairs])
            sums = sums.index_add(0, where, embeddings[torch.tensor([i for _, i in pairs])])
        said = torch.zeros(n_slots, dtype=torch.bool)
        said[[s for s, _ in pairs]] = True
        rows.append(torch.where(said[:, None], sums, silence[None].to(sums.dtype)))
    return F.normalize(torch.stack(rows).float(), dim=-1) * norm


def reading_loss(model: FastSLM, batch: Batch, slots: list[list[tuple[int, int]]], silence: Tensor,
                 norm: Tensor, bf16: bool = False) -> Tensor:
    """Answer cross-entropy on pseudo speech tokens: the slot loss pulls real speech tokens towards
    the same directions, so what the decoder learns here (copying words out of slots, answering
    questions about them, for far more sentences than were synthesised) carries over to audio.
    Costs the decoder only."""
    speech = pseudo_speech(slots, model.llm.model.embed_tokens.weight, silence, model.config.tokens_per_window, norm)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return answer_loss(model, speech, batch)


def forward_loss(model: FastSLM, batch: Batch, bf16: bool = False, slot_head: SlotHead | None = None,
                 align_weight: float = 0.0, ctc_weight: float = 0.0,
                 tuned_top_blocks: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(total, answer cross-entropy, slot loss, mean speech-token norm, CTC loss): the weighted
    mean cross-entropy over the answer tokens, plus `align_weight` times the slot loss and
    `ctc_weight` times the slot CTC loss (see the module docstring)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        speech = speech_from_features(model, batch.features, tuned_top_blocks)  # (B, Q, H)
        answer = answer_loss(model, speech, batch)
    norm = speech.detach().float().norm(dim=-1).mean()
    zero = answer.new_zeros(())
    if slot_head is None or not align_weight or batch.slots is None:
        return answer, answer.detach(), zero, norm, zero
    log_probs = slot_head(speech, model.llm.model.embed_tokens.weight)
    aligned = slot_cross_entropy(log_probs, batch.slots, batch.slot_weights)
    total = answer + align_weight * aligned
    ctc = zero
    if ctc_weight and batch.sequences is not None:
        ctc = slot_ctc_loss(log_probs, batch.sequences, slot_head.nothing)
        total = total + ctc_weight * ctc
    return total, answer.detach(), aligned.detach(), norm, ctc.detach()


# ---------------------------------------------------------------------------------------------
# Weight averaging


class WeightAverage:
    """An exponential moving average of the trainable parameters, kept beside the training weights.

    The learning rate ends at 5% of its peak, so neighbouring checkpoints still differ by a few
    WER points on the selection set; the average smooths that step-to-step noise without
    touching the trajectory (the optimizer never sees it).
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float, tensors: list[Tensor] | None = None):
        self.params, self.decay = params, decay
        self.tensors = [p.detach().clone() for p in params] if tensors is None else tensors
        if [t.shape for t in self.tensors] != [p.shape for p in params]:
            raise RecipeError("the saved weight average does not fit this model; delete the run's train folder")

    def update(self) -> None:
        with torch.no_grad():
            for t, p in zip(self.tensors, self.params):
                t.lerp_(p, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the averaged weights inside the block and its own ones again after it."""
        own = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, t in zip(self.params, self.tensors):
                p.copy_(t)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, own):
                    p.copy_(t)


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    def __init__(
        self,
        model: FastSLM,
        tokenizer: Tokenizer,
        windows: list[dict],
        features: FeatureStore,
        out_dir: Path,
        options: TrainOptions = TrainOptions(),
        evaluator=None,  # callable(model) -> dict with "wer" (and optionally "qa"); None: no evaluation
        progress: bool = True,
        utterances: dict | None = None,  # id -> windows.Utterance; needed for the slot loss
        reading_texts: list[str] | None = None,  # training sentences for reading batches
        token_times: dict[str, list[float]] | None = None,  # window id -> token times (alignment.py)
    ):
        if len(windows) != len(features):
            raise RecipeError(f"{len(windows)} windows but {len(features)} feature rows: rerun the features stage")
        if features.tuned_top_blocks != options.tune_encoder_blocks:
            raise RecipeError(f"the features hold the input of the encoder's last {features.tuned_top_blocks} blocks, "
                              f"but training tunes {options.tune_encoder_blocks}: run the features stage with the "
                              "same --tune-encoder-blocks")
        encoder, n = model.audio_tower.whisper, options.tune_encoder_blocks
        tuned = {id(p) for p in encoder.parameters() if p.requires_grad}
        if tuned != {id(p) for m in ([*encoder.blocks[len(encoder.blocks) - n:], encoder.ln_post] if n else [])
                     for p in m.parameters()}:
            raise RecipeError(f"the model's trainable encoder weights do not match --tune-encoder-blocks "
                              f"{options.tune_encoder_blocks}: build it with new_model(..., tune_encoder_blocks=)")
        self.model, self.windows, self.features = model, windows, features
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.o = options
        self.examples = Examples(tokenizer, model.config.tokens_per_window)
        self.evaluator = evaluator
        self.progress = progress
        self.slot_head, self._slots = None, []
        if options.align_weight:
            if utterances is None:
                raise RecipeError("the slot loss needs the corpus utterances (their texts and durations)")
            q = model.config.tokens_per_window
            if options.slot_timing == "whisper" and token_times is None:
                raise RecipeError("--slot-timing whisper needs the align stage's token times")
            times = token_times if options.slot_timing == "whisper" else {}
            self._slots = [token_slots(w, utterances, tokenizer, q, times=times.get(w["id"])) for w in windows]
            self.slot_head = SlotHead(model.config.qwen3.hidden_size, model.config.qwen3.vocab_size, options.seed + 3)
        self.reading_texts = reading_texts or []
        if (options.reading_batch or options.reading_qa or options.reading_qa_from) \
                and (self.slot_head is None or not self.reading_texts):
            raise RecipeError("reading batches need the slot loss (align_weight > 0) and training sentences")
        if options.ctc_weight < 0 or (options.ctc_weight and self.slot_head is None):
            raise RecipeError(f"--ctc-weight {options.ctc_weight}: give a weight >= 0, and a positive "
                              "--align-weight (the CTC loss reads the speech tokens through the slot head)")
        params = trainable_parameters(model) + (list(self.slot_head.parameters()) if self.slot_head else [])
        new = [p for p in params if id(p) not in tuned]
        pretrained = [p for p in params if id(p) in tuned]
        groups = [{"params": [p for p in new if p.dim() >= 2], "weight_decay": options.weight_decay},
                  {"params": [p for p in new if p.dim() < 2], "weight_decay": 0.0}]
        if pretrained:  # only then, so the optimizer state of runs without it keeps its two groups
            groups += [{"params": [p for p in pretrained if p.dim() >= 2], "weight_decay": options.weight_decay,
                        "lr_scale": options.encoder_lr_scale},
                       {"params": [p for p in pretrained if p.dim() < 2], "weight_decay": 0.0,
                        "lr_scale": options.encoder_lr_scale}]
        self.optimizer = torch.optim.AdamW(groups, lr=options.lr, betas=options.betas)
        self.step = 0
        self.total_steps = options.steps
        self.eval_every = options.eval_every
        self.elapsed_s = 0.0
        # CPU seconds of this run over every resume: the recipe's cost on a shared machine, where
        # wall time counts the other jobs too (a killed chunk loses at most one checkpoint's worth)
        self._cpu_before, self._cpu_mark = 0.0, time.process_time()
        self.best = {"wer": None, "step": None}
        self._perms: dict[int, np.ndarray] = {}
        self._stop = False
        self._evaluated_at: int | None = None
        self.ema: WeightAverage | None = None
        self._resume()

    # -- state ------------------------------------------------------------------------------

    def _resume(self) -> None:
        path = self.out / STATE_FILE
        if not path.is_file():
            return
        state = torch.load(path, weights_only=True)
        if not same_trajectory(state["options"], self.o.trajectory_key(), state["step"]) \
                or state["config"] != self.model.config.to_dict():
            raise RecipeError(f"{path} was written with other options or model dims; pass the same ones, "
                              f"or delete {self.out} to train from scratch")
        load_trainable_state(self.model, state["model"])
        if self.slot_head is not None:
            self.slot_head.load_state_dict(state["slot_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        kind, keys, pos, has_gauss, gauss = state["numpy_rng"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state["python_rng"])
        self.step, self.elapsed_s, self.best = state["step"], state["elapsed_s"], state["best"]
        self._cpu_before = state.get("cpu_s", 0.0)  # absent from checkpoints of older runs
        saved_ema = state.get("ema")
        if self.o.ema_decay and self.step >= max(1, self.o.ema_from):
            if saved_ema is None or (saved_ema["decay"], saved_ema["from"]) != (self.o.ema_decay, self.o.ema_from):
                raise RecipeError(f"{path} is at step {self.step}, past --ema-from {self.o.ema_from}, without a "
                                  f"weight average of decay {self.o.ema_decay} from that step; resume with the "
                                  "--ema-decay/--ema-from it was written with, or delete it to start over")
            self.ema = WeightAverage(trainable_parameters(self.model), self.o.ema_decay, saved_ema["tensors"])
        self.total_steps = self.o.steps if self.o.steps is not None else state["total_steps"]
        self.eval_every = self.o.eval_every if self.o.eval_every is not None else state["eval_every"]

    def save(self) -> None:
        atomic_save({
            "step": self.step,
            "total_steps": self.total_steps,
            "eval_every": self.eval_every,
            "elapsed_s": self.elapsed_s,
            "cpu_s": self.cpu_seconds,
            "best": self.best,
            "model": trainable_state(self.model),
            "slot_head": self.slot_head.state_dict() if self.slot_head is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": _numpy_rng_state(),
            "python_rng": random.getstate(),
            "options": self.o.trajectory_key(),
            "config": self.model.config.to_dict(),
            "ema": None if self.ema is None else {"decay": self.o.ema_decay, "from": self.o.ema_from,
                                                  "tensors": self.ema.tensors},
        }, self.out / STATE_FILE)

    @property
    def cpu_seconds(self) -> float:
        return self._cpu_before + time.process_time() - self._cpu_mark

    def log(self, record: dict) -> None:
        with (self.out / LOG_FILE).open("a") as f:
            f.write(json.dumps(record) + "\n")

    # -- data -------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.o.seed, 1, epoch]).permutation(len(self.windows))}
        return self._perms[epoch]

    def batch_for(self, step: int) -> Batch:
        """Everything random about step `step` comes from (seed, step): resumes replay it exactly."""
        n, bs = len(self.windows), self.o.batch_size
        picks = [self._permutation(p // n)[p % n] for p in range(step * bs, (step + 1) * bs)]
        rng = np.random.default_rng([self.o.seed, 2, step])
        chosen = []
        for w in picks:
            exs = self.windows[w]["examples"]  # exs[0]: the window's transcript (ASR), then its questions
            k = int(rng.integers(1, len(exs))) if len(exs) > 1 and rng.random() < self.o.qa_prob else 0
            chosen.append({**exs[k], "thinking": thinking_for(exs[k]["instruction"], exs[0]["answer"], step, self.o)}
                          if k and thinks_at(step, self.o) else exs[k])
        batch = self.examples.batch(self.features.batch([int(w) for w in picks]), chosen, self.qa_weight_at(step))
        if self.slot_head is not None:
            batch.slots, batch.slot_weights = slot_targets(
                [self._slots[w] for w in picks], self.model.config.tokens_per_window, self.slot_head.nothing,
                self.o.silent_slot_weight)
            if self.o.ctc_weight:
                batch.sequences = [[token for _, token in self._slots[w]] for w in picks]
        batch.windows = [int(w) for w in picks]
        frames = [-(-int(self.windows[w].get("samples", WINDOW_SAMPLES)) // FRAME_SAMPLES) for w in picks]
        spec_augment_(batch.features, rng, self.o, frames)
        return batch

    def reading_for(self, step: int) -> tuple[Batch, list[list[tuple[int, int]]]] | None:
        """The text-only samples of step `step` (seeded by it, like batch_for), or None."""
        if not self.o.reading_batch:
            return None
        rng = np.random.default_rng([self.o.seed, 4, step])
        drawn = []
        for _ in range(self.o.reading_batch):
            window, utts = reading_window(self.reading_texts, rng)
            asr = {"task": "ASR", "instruction": Task.ASR.default_instruction, "answer": window["text"]}
            drawn.append((window, utts, asr))
        return self._text_only_batch(drawn)

    def reading_questions_for(self, step: int) -> tuple[Batch, list[list[tuple[int, int]]]] | None:
        """The text-only question samples of step `step` (seeded by it, like batch_for), or None.

        Each is a made-up window no longer than the real windows that carry questions, mostly one
        sentence as they are, and one question about it. Questions get their own loss term: in the
        audio batch their one- to three-token answers are about 1% of the answer tokens, and at
        step 2,000 of the issue-20 run the decoder answered none of the last-word, count and
        summary questions right even from text-made speech tokens that it transcribed at 7.6% WER.
        """
        count = reading_questions_at(step, self.o)
        if not count or not question_share(step, self.o):
            return None
        rng = np.random.default_rng([self.o.seed, 5, step])
        drawn = []
        weights = reading_question_weights_at(step, self.o)
        while len(drawn) < count:
            window, utts = reading_window(self.reading_texts, rng, single_fraction=0.75,
                                          longest=WindowOptions.qa_max_seconds)
            pairs = tasks.questions_for(window["text"], random.Random(int(rng.integers(2**32))))
            if not pairs:
                continue
            if weights is None:
                question, answer = pairs[int(rng.integers(len(pairs)))]
            else:
                p = np.array([weights.get(tasks.question_type(q), 1.0) for q, _ in pairs])
                if not p.sum():
                    continue
                question, answer = pairs[int(rng.choice(len(pairs), p=p / p.sum()))]
            task, instruction = resolve_task(question)
            example = {"task": task.name, "instruction": instruction, "answer": answer}
            drawn.append((window, utts, {**example, "thinking": thinking_for(question, window["text"], step, self.o)}
                           if thinks_at(step, self.o) else example))
        # all answers weigh the same until thinking adds transcript tokens to them
        return self._text_only_batch(drawn, self.qa_weight_at(step) if thinks_at(step, self.o) else 1.0)

    def qa_weight_at(self, step: int) -> float:
        return 1.0 + (self.o.qa_weight - 1.0) * question_share(step, self.o)

    def _text_only_batch(self, drawn: list[tuple[dict, dict, dict]],
                         qa_weight: float = 1.0) -> tuple[Batch, list[list[tuple[int, int]]]]:
        """(window spec, its utterances, example) triples as a batch for pseudo speech, with each window's slots."""
        q = self.model.config.tokens_per_window
        slots = [token_slots(window, utts, self.examples.tok, q) for window, utts, _ in drawn]
        return self.examples.batch(None, [example for _, _, example in drawn], qa_weight), slots

    # -- loop -------------------------------------------------------------------------------

    def train_step(self, batch: Batch, reading: tuple[Batch, list] | None = None,
                   questions: tuple[Batch, list] | None = None) -> tuple[float, float, float, float]:
        """One optimizer step; returns (answer cross-entropy, slot loss, CTC loss, gradient norm)."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.total_steps, self.o) * group.get("lr_scale", 1.0)
        self.model.train()
        loss, answer, aligned, norm, ctc = forward_loss(self.model, batch, self.o.bf16, self.slot_head,
                                                        self.o.align_weight, self.o.ctc_weight,
                                                        self.o.tune_encoder_blocks)
        if reading is not None:
            loss = loss + reading_loss(self.model, reading[0], reading[1], self.slot_head.silence, norm, self.o.bf16)
        if questions is not None:
            loss = loss + question_share(self.step, self.o) * reading_loss(
                self.model, questions[0], questions[1], self.slot_head.silence, norm, self.o.bf16)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.o.grad_clip)
        self.optimizer.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update()
        elif self.o.ema_decay and self.step >= max(1, self.o.ema_from):
            self.ema = WeightAverage(trainable_parameters(self.model), self.o.ema_decay)
        return float(answer), float(aligned), float(ctc), float(norm)

    def _calibrate(self, seconds_per_step: float) -> None:
        if self.total_steps is None:
            self.total_steps = max(self.o.warmup_steps + 1, int(self.o.hours * 3600 * 0.97 / seconds_per_step))
        if self.eval_every is None:
            self.eval_every = max(1, round(self.o.eval_minutes * 60 / seconds_per_step)) if self.o.eval_minutes else 0
        self.log({"event": "calibrated", "step": self.step, "seconds_per_step": round(seconds_per_step, 4),
                  "total_steps": self.total_steps, "eval_every": self.eval_every})

    def selection_score(self, result: dict) -> float:
        """What the best checkpoint minimises: WER, plus the weighted QA error when the run selects on both.

        QA swings by several points between neighbouring checkpoints (a few hundred questions), so
        picking on WER alone can keep a checkpoint that answers far worse than its neighbours.
        """
        if not self.o.select_qa_weight:
            return result["wer"]
        if "qa" not in result:
            raise RecipeError("--select-qa-weight needs QA accuracy in every evaluation (the evaluator's with_qa)")
        return result["wer"] + self.o.select_qa_weight * (100.0 - result["qa"])

    def evaluate(self) -> dict | None:
        if self.evaluator is None:
            return None
        t0 = time.perf_counter()
        result = self.evaluator(self.model)
        self._evaluated_at = self.step
        self._keep_if_best(result, "raw")
        record = {"event": "eval", "step": self.step, **result}
        if self.ema is not None:
            with self.ema.swapped_in():
                averaged = self.evaluator(self.model)
                self._keep_if_best(averaged, "ema")
            record["ema"] = averaged
        self.model.train()
        self.log({**record, "best": self.best, "seconds": round(time.perf_counter() - t0, 1)})
        return result

    def _keep_if_best(self, result: dict, weights: str) -> None:
        """Make the model's current weights (`weights` says which) best.pt when they score best so far."""
        score = self.selection_score(result)
        if self.best["wer"] is not None and score >= self.selection_score(self.best):
            return
        self.best = {"wer": result["wer"], "step": self.step,
                     **({"qa": result["qa"], "score": round(score, 2)} if "qa" in result else {}),
                     **({"weights": weights} if weights != "raw" else {})}
        atomic_save({"step": self.step, "model": trainable_state(self.model), "eval": result, "weights": weights,
                     "config": self.model.config.to_dict(),
                     "slot_head": self.slot_head.state_dict() if self.slot_head is not None else {}},
                    self.out / BEST_FILE)

    def run(self, max_steps: int | None = None) -> dict:
        """Train until the schedule ends (or `max_steps` more steps); checkpoint on the way and at the end."""
        handlers = self._install_signal_handlers()
        try:
            return self._run(max_steps)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _run(self, max_steps: int | None) -> dict:
        o = self.o
        stop_at = self.step + max_steps if max_steps is not None else None
        last_ckpt = time.monotonic()
        timing_start, timing_from = None, None
        bar = tqdm(initial=self.step, total=self.total_steps, desc="train", unit="step", disable=not self.progress,
                   smoothing=0.05)
        run_from, window_loss, window_slot, window_ctc = self.step, [], [], []
        log_time, log_step = time.monotonic(), self.step
        while (self.total_steps is None or self.step < self.total_steps) and (stop_at is None or self.step < stop_at):
            t0 = time.monotonic()
            loss, aligned, ctc, norm = self.train_step(self.batch_for(self.step), self.reading_for(self.step),
                                                       self.reading_questions_for(self.step))
            self.elapsed_s += time.monotonic() - t0
            window_loss.append(loss)
            window_slot.append(aligned)
            window_ctc.append(ctc)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            # calibration: time the steps after the first 3 of this run (the first ones are slow)
            if self.total_steps is None or self.eval_every is None:
                if self.step == run_from + 3:
                    timing_start, timing_from = time.monotonic(), self.step
                elif timing_start is not None and self.step >= max(o.calibrate_steps, timing_from + 5):
                    self._calibrate((time.monotonic() - timing_start) / (self.step - timing_from))
                    bar.total = self.total_steps
                    bar.refresh()
            if self.step % o.log_every == 0:
                now = time.monotonic()
                rate = (self.step - log_step) / max(1e-9, now - log_time)  # since the last log line, evals included
                self.log({"step": self.step, "loss": round(float(np.mean(window_loss)), 4),
                          "slot": round(float(np.mean(window_slot)), 4), "grad_norm": round(norm, 3),
                          **({"ctc": round(float(np.mean(window_ctc)), 4)} if o.ctc_weight else {}),
                          "lr": learning_rate(self.step - 1, self.total_steps, o), "steps_per_s": round(rate, 4),
                          "elapsed_s": round(self.elapsed_s, 1), "cpu_s": round(self.cpu_seconds, 1)})
                window_loss, window_slot, window_ctc, log_time, log_step = [], [], [], now, self.step
            if self.eval_every and self.step % self.eval_every == 0:
                self.evaluate()
                self.save()
                last_ckpt = time.monotonic()
            elif time.monotonic() - last_ckpt > o.checkpoint_minutes * 60:
                self.save()
                last_ckpt = time.monotonic()
            if self._stop:
                break
        finished = self.total_steps is not None and self.step >= self.total_steps
        if finished and self.evaluator is not None and self._evaluated_at != self.step:
            self.evaluate()
        self.save()
        bar.close()
        return {"step": self.step, "total_steps": self.total_steps, "finished": finished, "best": self.best,
                "interrupted": self._stop}

    def _install_signal_handlers(self) -> dict:
        """SIGINT / SIGTERM finish the current step, checkpoint, and return (main thread only)."""
        def stop(_sig, _frame):
            self._stop = True

        old = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread
            pass
        return old


def _numpy_rng_state() -> tuple:
    """numpy's global RNG state with the key array as a tensor (so torch.load(weights_only=True) reads it)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)
