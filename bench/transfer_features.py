"""Transfer learning on CPU: a head epoch on cached frozen-backbone features vs. the same epoch end to end, and
the fine-tuning epoch, measured in one run on the same data and backbone.

    .venv/bin/python bench/transfer_features.py --image-size 128 --images-per-class 100 --json bench/results/transfer_features.json

Phases as tasks/transfer.py runs them: (a) computing the features once (timed on the train split), (b) phase-1 head epochs
on those features, (c) the same phase-1 epochs end to end (images through the frozen backbone every epoch),
(d) phase-2 epochs fine-tuning the top 20 layers. Per-image costs give the budget estimate for a real-photo
set (`--estimate-images`, 70 % of it trained on, as the default split).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _epoch_seconds(model, x, y, val, epochs: int, batch_size: int) -> list[float]:
    import keras

    marks: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            marks.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            marks[-1] = time.perf_counter() - marks[-1]

    model.fit(x, y, batch_size=batch_size, epochs=epochs, validation_data=val, callbacks=[Timer()], verbose=0)
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--images-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measured phase (the first one compiles)")
    parser.add_argument("--fine-tune-layers", type=int, default=20)
    parser.add_argument("--estimate-images", type=int, default=1400)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    workspace = Path(tempfile.mkdtemp(prefix="cassava-bench-transfer-"))
    os.environ["CASSAVA_WORKSPACE"] = str(workspace)
    import keras
    import numpy as np

    from tasks.data import acquire, prepare_dataset
    from tasks.features import extract_features
    from tasks.model import build_classifier
    from tasks.params import load_params
    from tasks.prepared import PreparedData
    from tasks.train import seed_everything
    from tasks.transfer import feature_extractor, freeze_backbone, head_on_features, unfreeze_top_layers

    params = load_params(Path(__file__).resolve().parent.parent / "params.yaml", overrides=[
        f"data.image_size={args.image_size}", f"data.synthetic.images_per_class={args.images_per_class}",
        f"data.synthetic.render_size={max(96, args.image_size)}", f"model.backbone={args.backbone}",
        f"model.backbone_alpha={args.alpha}",
    ])
    acquire(params.data, workspace / "raw")
    prepare_dataset(params.data, workspace / "raw", workspace / "prepared")
    prepared = PreparedData(workspace / "prepared")
    train_x, train_y = (np.asarray(array) for array in prepared.split("train"))
    val_x, val_y = (np.asarray(array) for array in prepared.split("val"))
    train_x, val_x = train_x.astype(np.float32), val_x.astype(np.float32)
    batch = params.train.batch_size

    seed_everything(0)
    model = build_classifier(params.model, args.image_size, len(prepared.class_names()), 0)
    freeze_backbone(model)
    extractor = feature_extractor(model)
    extract_features(extractor, train_x, params.evaluate.batch_size)  # traces every batch shape: not timed
    started = time.perf_counter()
    train_features = extract_features(extractor, train_x, params.evaluate.batch_size)
    extraction = time.perf_counter() - started
    val_features = extract_features(extractor, val_x, params.evaluate.batch_size)

    compile_args = {"loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]}
    head = head_on_features(model)
    head.compile(optimizer=keras.optimizers.Adam(1e-3), **compile_args)
    cached = _epoch_seconds(head, train_features, train_y, (val_features, val_y), args.epochs, batch)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), **compile_args)
    end_to_end = _epoch_seconds(model, train_x, train_y, (val_x, val_y), args.epochs, batch)
    unfreeze_top_layers(model, args.fine_tune_layers)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), **compile_args)
    fine_tune = _epoch_seconds(model, train_x, train_y, (val_x, val_y), args.epochs, batch)

    steady = lambda seconds: statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]  # noqa: E731
    per_image_extract = extraction / len(train_y)
    per_image_fine_tune = (steady(fine_tune) - len(val_y) * per_image_extract) / len(train_y)
    train_share = 0.7
    estimate = {
        "features once (s)": args.estimate_images * 0.85 * per_image_extract,  # train + val
        "fine-tune epoch (s)": args.estimate_images * (train_share * per_image_fine_tune + 0.15 * per_image_extract),
    }
    result = {
        "backbone": args.backbone, "alpha": args.alpha, "image_size": args.image_size,
        "train_images": len(train_y), "val_images": len(val_y), "load_average": os.getloadavg()[0],
        "train_feature_extraction_s": extraction, "per_image_extraction_ms": 1000 * per_image_extract,
        "head_epoch_cached_s": cached, "head_epoch_end_to_end_s": end_to_end, "fine_tune_epoch_s": fine_tune,
        "per_image_fine_tune_step_ms": 1000 * per_image_fine_tune,
        "speed_up_steady": steady(end_to_end) / steady(cached),
        f"estimate for {args.estimate_images} images": estimate,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
