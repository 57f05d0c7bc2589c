"""Start-up cost of `python -m tasks.predict` on a handful of images, against a bare Keras baseline.

In a throw-away workspace, the default model (`tasks.model.build_classifier`, params.yaml; untrained: start-up
does not depend on the weights) is logged the way the train stage logs it (`tasks.tracking.log_keras_model`, in
the workspace's SQLite store) and registered as `cassava-classifier@champion`; --images JPEG files are written.
Then, each in a fresh process, timed from launch to exit (wall and CPU time):

  bare     python -c: import keras, `keras.saving.load_model` of the model file on disk, read the images
           (Pillow, resized), `model.predict`: the least any prediction from a saved Keras model pays
  bare-mlflow  the same, the model loaded from the registry with MLflow (`mlflow.keras.load_model` of the
           champion URI, the workspace's SQLite store): the least a prediction from the registry pays
  predict  `python -m tasks.predict <folder>` as a user runs it: champion resolved in the registry, model
           loaded, images read, CSV written
  predict-runs  the same with `--model runs:/<run id>/model`

With --before COMMIT, `predict` is also run on that commit's code (`git archive`; mode `predict@COMMIT`), in
the same workspace and interleaved with the others: before and after a change, in one run.

Modes are interleaved, order rotated every repeat; medians reported. The difference predict - bare is what the
project adds on top of TensorFlow's and Keras' own start-up; predict - bare-mlflow what it adds on top of MLflow's.

    .venv/bin/python bench/predict_startup.py --repeats 5 --before main --json bench/results/predict_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, os.environ.get("CASSAVA_BENCH_CODE") or str(Path(__file__).resolve().parent.parent))

import _common as common  # noqa: E402

MODES = ("bare", "bare-mlflow", "predict", "predict-runs")

SETUP = """
from pathlib import Path
import numpy as np
from PIL import Image
import mlflow
from mlflow import MlflowClient
from tasks.model import build_classifier
from tasks.names import CLASSES_TAG
from tasks.params import load_params
from tasks.tracking import configure_tracking, log_keras_model

params = load_params(None)
size = params.data.image_size
model = build_classifier(params.model, size, 5, 0)
folder = Path("model_files")
folder.mkdir()
model.save(folder / "model.keras")
np.save(folder / "input_example.npy", np.zeros((2, size, size, 3), np.float32))
configure_tracking()
with mlflow.start_run() as run:
    mlflow.set_tags({CLASSES_TAG: "cbb,cbsd,cgm,cmd,healthy"})
    log_keras_model(folder)
version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "cassava-classifier")
MlflowClient().set_registered_model_alias("cassava-classifier", "champion", version.version)
images = Path("images")
images.mkdir()
rng = np.random.default_rng(0)
for index in range(COUNT):
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(images / f"leaf{index}.jpg")
Path("run_id.txt").write_text(run.info.run_id)
"""

BARE = """
from pathlib import Path
import numpy as np
import keras
from PIL import Image
LOAD
size = model.input_shape[1]
pixels = np.stack([np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR),
                              dtype=np.float32) for path in sorted(Path("images").glob("*.jpg"))])
print(model.predict(pixels, verbose=0).argmax(axis=1))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--before", metavar="COMMIT", help="also run predict on this commit's code")
    common.add_output_options(parser)
    args = parser.parse_args()

    for variable in common.UNSET:
        os.environ.pop(variable, None)
    scratch = Path(tempfile.mkdtemp(prefix="cassava-bench-predict-"))
    common.select_code(args.live, scratch)
    info = common.machine_info()
    common.print_machine(info)
    workspace = common.make_workspace("predict", parent=str(scratch))
    env = common.child_env(workspace, TQDM_DISABLE="1")
    setup = common.run_child([common.PYTHON, "-c", SETUP.replace("COUNT", str(args.images))], env, workspace,
                             workspace / "setup.log")
    if setup.returncode != 0:
        print((workspace / "setup.log").read_text()[-3000:])
        return 1
    run_id = (workspace / "run_id.txt").read_text().strip()
    print(f"set-up: default model logged and registered as champion ({setup.wall_s:.1f} s); {args.images} images")
    commands = {
        "bare": [common.PYTHON, "-c", BARE.replace("LOAD", 'model = keras.saving.load_model("model_files/model.keras")')],
        "bare-mlflow": [common.PYTHON, "-c", BARE.replace("LOAD", "import mlflow\n"
                        "mlflow.set_tracking_uri(f'sqlite:///{Path(\"mlflow.db\").resolve()}')\n"
                        "model = mlflow.keras.load_model('models:/cassava-classifier@champion')")],
        "predict": [common.PYTHON, "-m", "tasks.predict", "images", "-o", "out/predictions.csv"],
        "predict-runs": [common.PYTHON, "-m", "tasks.predict", "images", "--model", f"runs:/{run_id}/model",
                         "-o", "out/predictions.csv"],
    }
    envs = {mode: env for mode in commands}
    if args.before:
        before_code = scratch / "before"
        before_code.mkdir()
        archive = subprocess.run(["git", "archive", args.before], cwd=common.REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before_code)], input=archive, check=True)
        mode = f"predict@{args.before}"
        commands[mode], envs[mode] = commands["predict"], {**env, "PYTHONPATH": str(before_code)}
        args.modes.append(mode)
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
    for repeat in range(args.repeats):
        order = args.modes[repeat % len(args.modes):] + args.modes[:repeat % len(args.modes)]
        for mode in order:
            load = os.getloadavg()[0]
            log_file = workspace / f"{mode}-{repeat}.log"
            result = common.run_child(commands[mode], envs[mode], workspace, log_file)
            if result.returncode != 0:
                print(f"{mode} FAILED (exit {result.returncode}):\n{log_file.read_text()[-2000:]}")
                return 1
            runs[mode].append({"wall_s": result.wall_s, "cpu_s": result.cpu_s, "load": load})
            print(f"  repeat {repeat + 1} {mode:13s} {result.wall_s:5.1f} s wall, {result.cpu_s:5.1f} CPU s (load {load:.1f})",
                  flush=True)

    rows = [[mode, common.median(r["wall_s"] for r in results), common.spread(r["wall_s"] for r in results),
             common.median(r["cpu_s"] for r in results)] for mode, results in runs.items()]
    print(f"\nmedian of {args.repeats} (launch to exit, fresh process each)")
    print(common.table(rows, ["mode", "wall s", "range", "CPU s"]))
    if "bare" in runs:
        bare = common.median(r["wall_s"] for r in runs["bare"])
        for mode in args.modes:
            if mode != "bare":
                wall = common.median(r["wall_s"] for r in runs[mode])
                cpu = common.median(r["cpu_s"] for r in runs[mode]) - common.median(r["cpu_s"] for r in runs["bare"])
                print(f"{mode} - bare = {wall - bare:.1f} s wall, {cpu:.1f} CPU s; {mode} / bare = {wall / bare:.2f}")
    common.finish({"machine": info, "runs": runs, "images": args.images}, args.json, scratch, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
