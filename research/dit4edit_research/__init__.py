"""Research code around dit4edit, kept out of the installed editor.

- `synthetic`: the synthetic world of flat shapes (scene sampler, renderer, captions, the oracle that reads a picture
  back), used to train the embedded model and to score edits against a known ground truth.
- `bench_synthetic`: the editing benchmark on that world (`python -m dit4edit_research.bench_synthetic --help`).
- `devices`: timing helpers the benchmark scripts share (device description, synchronisation).
"""
