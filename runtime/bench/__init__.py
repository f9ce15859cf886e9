"""fastslm-bench: long-audio transcription against faster-whisper, every backend and precision present.

runs      the systems compared (fastslm per backend / precision, the faster-whisper peer), each run as
          its own process: wall time and peak RSS of the whole process, transcript for WER
stages    in-process stage metrics per fastslm variant: audio tower, prefill, time to first token,
          decode rate, the frame-level prefill baseline, weight bytes per decode token vs bandwidth
report    the markdown table and the PNG plot
cli       the command (`fastslm-bench`): builds the recordings, runs everything interleaved and resumably
sessions  many questions about one recording: 1st/2nd question TTFT, cache load, TTFT at a stream's end
          (python -m fastslm.runtime.bench.sessions)
peer      the faster-whisper side of a run (python -m fastslm.runtime.bench.peer AUDIO)
"""
