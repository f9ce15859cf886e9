"""fastslm: deployment runtime for FastSLM speech language models.

`fastslm.runtime` is torch-free (numpy, soundfile, tokenizers, onnxruntime);
`fastslm.models` and `fastslm.export` need the `[export]` extra (torch).
"""

__version__ = "0.1.0"
