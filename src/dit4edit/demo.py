"""`make demo`: edit the shipped example with the embedded model (or, without one, a tiny random model)."""

from __future__ import annotations

import sys
from pathlib import Path

from . import cli
from .model_folder import EMBEDDED_MODEL, ModelDefaults

EXAMPLE = Path(__file__).parent / "examples" / "red-circle.png"
SOURCE = "a red circle on a white background"
TARGET = "a blue circle on a white background"


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:] or ["out"])[0])
    out.mkdir(parents=True, exist_ok=True)
    model_args: list[str] = []
    model = EMBEDDED_MODEL
    if not (EMBEDDED_MODEL / "model_index.json").is_file():
        tiny = out / "tiny-model"
        print("dit4edit demo: this install has no embedded trained model yet, so the demo uses a tiny model with "
              "RANDOM weights: the pipeline runs end to end, but the picture is noise.")
        if not (tiny / "model_index.json").is_file():
            code = cli.main(["make-tiny-model", str(tiny)])
            if code:
                return code
        model_args, model = ["--model", str(tiny)], tiny
    output = out / "demo-edit.png"
    # The same settings as `dit4edit edit`: the model's own (its dit4edit.json), else the library's.
    code = cli.main(["edit", str(EXAMPLE), "-s", SOURCE, "-t", TARGET, "-o", str(output), *model_args])
    if code == 0:
        defaults = ModelDefaults.from_folder(model)
        print(f"dit4edit demo: edited {EXAMPLE.name} ({SOURCE!r} -> {TARGET!r}) with {defaults.num_inference_steps} "
              f"steps, {defaults.inversion}, guidance {defaults.guidance_scale:g}; the result is {output.resolve()}")
    return code


if __name__ == "__main__":
    sys.exit(main())
