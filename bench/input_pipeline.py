"""Training steps per second of the project's input pipeline vs. in-memory tensors, and the share of the
machine's float32 peak that training reaches.

In one process, on data prepared by the project (its acquire + prepare, in a throw-away workspace), the same
model (`build_classifier`, `build_optimizer`, `seed_everything` before each fit) is trained with Keras `fit`
on three inputs:

  mmap      the project's pipeline: `tasks.prepared.batched_dataset` over the memory-mapped uint8 split
            (index shuffle, numpy gather + float32 cast in `tf.numpy_function`, prefetch), called the way
            `train_classifier` calls it
  memory    the split loaded into RAM as float32, `tf.data.Dataset.from_tensor_slices(...).shuffle(N)
            .batch(B).prefetch(AUTOTUNE)`
  constant  one fixed in-memory batch repeated: no input work at all (compute-only ceiling)

Each variant has its own model; they are trained one epoch (one `fit(epochs=1)` call, no validation, timed
from Keras' train begin to train end) at a time, alternating (order rotated every round), so that
neighbouring epochs of the variants see the same load on a shared machine. The first epoch of each (tracing, first allocations) is excluded; a repeat is --epochs
timed epochs of every variant; the median over --repeats is reported. The ratio mmap / memory of steps/s is
the figure of merit (target >= 0.95); CPU time per step (this process, all threads) is printed next to it,
being less sensitive than wall time to other people's jobs.

FLOPs per image are counted analytically from the layer shapes (conv: 2*H_out*W_out*k*k*C_in*C_out, dense:
2*in*out; batch norm, activations, pooling not counted) and cross-checked with TensorFlow's profiler
(float_operation over the graph of the forward pass, batch 1). Training FLOPs are taken as 3x forward
(forward + backward w.r.t. activations + w.r.t. weights). The machine's limit is the float32 matmul rate
measured in the same run (tf.linalg.matmul of 2048x2048 float32, GFLOP/s = 2 n^3 / t), measured before
each repeat.

    .venv/bin/python bench/input_pipeline.py                       # default and large configurations
    .venv/bin/python bench/input_pipeline.py --configs default --repeats 3 --epochs 4
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The project code: the snapshot a parent benchmark hands its children, else this checkout.
sys.path.insert(1, os.environ.get("CASSAVA_BENCH_CODE") or str(Path(__file__).resolve().parent.parent))

import _common as common  # noqa: E402

# name -> (overrides applied to params.yaml, timed epochs by default)
CONFIGS: dict[str, list[str]] = {
    "default": [],  # params.yaml: 64x64, batch 32, 200 synthetic images per class
    "large": ["data.image_size=128", "data.synthetic.render_size=128", "train.batch_size=64"],
}
VARIANTS = ("mmap", "memory", "constant")


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """float32 matmul rate of this machine now (GFLOP/s), the best of three timings of `repeats` products."""
    import tensorflow as tf

    a = tf.random.stateless_uniform((n, n), seed=(1, 2), dtype=tf.float32)
    b = tf.random.stateless_uniform((n, n), seed=(3, 4), dtype=tf.float32)
    product = tf.function(lambda x, y: tf.linalg.matmul(x, y))
    product(a, b).numpy()  # trace + warm up
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            result = product(a, b)
        result.numpy()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 * repeats / best / 1e9


def analytic_forward_flops(model: Any) -> tuple[float, dict[str, float]]:
    """Multiply-adds x 2 of every Conv2D and Dense layer, per image."""
    import keras

    per_layer: dict[str, float] = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, c_in, c_out = layer.kernel.shape
            _, h_out, w_out, _ = layer.output.shape
            per_layer[layer.name] = 2.0 * h_out * w_out * kh * kw * c_in * c_out
        elif isinstance(layer, keras.layers.Dense):
            n_in, n_out = layer.kernel.shape
            per_layer[layer.name] = 2.0 * n_in * n_out
    return sum(per_layer.values()), per_layer


def profiler_forward_flops(model: Any, image_size: int) -> float | None:
    """TensorFlow profiler's float-operation count of the forward pass (inference mode), per image."""
    import tensorflow as tf

    try:
        from tensorflow.python.profiler import model_analyzer, option_builder

        forward = tf.function(lambda images: model(images, training=False))
        graph = forward.get_concrete_function(tf.TensorSpec([1, image_size, image_size, 3], tf.float32)).graph
        options = option_builder.ProfileOptionBuilder.float_operation()
        options["output"] = "none"
        return float(model_analyzer.profile(graph, options=options).total_float_ops)
    except Exception as error:  # the profiler is a TF1-era API: report, don't fail
        print(f"  (profiler FLOP count unavailable: {type(error).__name__}: {error})")
        return None


def TrainTimer() -> Any:
    """Callback timing a one-epoch fit from train begin to train end (input iterator creation and every
    step included; Keras' set-up before and clean-up after, which a many-epoch fit pays once, excluded)."""
    import keras

    class _TrainTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_train_end(self, logs: dict | None = None) -> None:
            self.seconds = time.perf_counter() - self.started
            self.cpu_seconds = time.process_time() - self.cpu_started  # this process, all threads

    return _TrainTimer()


def build_model(params: Any, num_classes: int, steps_per_epoch: int, determinism: bool) -> Any:
    import keras

    from tasks.model import build_classifier
    from tasks.train import build_optimizer, seed_everything

    if determinism:
        seed_everything(params.train.seed)
    else:
        keras.utils.set_random_seed(params.train.seed)
    model = build_classifier(params.model, params.data.image_size, num_classes, params.train.seed)
    model.compile(optimizer=build_optimizer(params.train, steps_per_epoch), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def make_input(variant: str, params: Any, mmap_images: Any, ram_images: Any, labels: Any, epoch: int) -> tuple[Any, dict]:
    """(dataset, extra fit kwargs) of one epoch of a variant; the mmap one as train_classifier builds it (for
    the one epoch `epoch`: a data set that ends with the epoch, so no prefetching outlives the fit call and
    competes with the next variant's epoch)."""
    import tensorflow as tf

    from tasks.prepared import batched_dataset

    batch_size, seed = params.train.batch_size, params.train.seed
    steps = math.ceil(len(labels) / batch_size)
    if variant == "mmap":
        if "epochs" in inspect.signature(batched_dataset).parameters:  # current project: epoch-indexed order
            dataset = batched_dataset(mmap_images, labels, batch_size, shuffle=True, seed=seed,
                                      epochs=range(epoch, epoch + 1))
            return dataset, {"steps_per_epoch": steps}
        return batched_dataset(mmap_images, labels, batch_size, shuffle=True, seed=seed), {}
    if variant == "memory":
        dataset = (tf.data.Dataset.from_tensor_slices((ram_images, labels))
                   .shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
                   .batch(batch_size).prefetch(tf.data.AUTOTUNE))
        return dataset, {}
    batch = (tf.constant(ram_images[:batch_size]), tf.constant(labels[:batch_size]))
    return tf.data.Dataset.from_tensors(batch).repeat(), {"steps_per_epoch": steps}


def run_config(name: str, overrides: list[str], workspace: Path, args: argparse.Namespace, timed_epochs: int,
               figures: dict[str, Any]) -> None:
    import numpy as np

    from tasks import layout
    from tasks.params import load_params
    from tasks.prepared import PreparedData

    os.environ["CASSAVA_WORKSPACE"] = str(workspace)
    params = load_params(workspace / "params.yaml", overrides)
    prepared = PreparedData(workspace / layout.PREPARED_DIR)
    mmap_images, labels = prepared.split("train")
    ram_images = np.asarray(mmap_images, dtype=np.float32)
    num_classes = len(prepared.class_names())
    batch_size = params.train.batch_size
    steps = math.ceil(len(labels) / batch_size)
    size = params.data.image_size
    print(f"\n== {name}: {size}x{size} images, batch {batch_size}, {len(labels)} training images = {steps} steps/epoch; "
          f"1 warm-up + {timed_epochs} timed epochs per fit; overrides: {' '.join(overrides) or '(none)'}")

    probe_model = build_model(params, num_classes, steps, args.determinism)
    forward, per_layer = analytic_forward_flops(probe_model)
    profiled = profiler_forward_flops(probe_model, size)
    layers_text = ", ".join(f"{key} {value / 1e6:.2f}M" for key, value in per_layer.items())
    profiled_text = f"{profiled / 1e6:.2f} M" if profiled else "n/a"
    print(f"forward FLOPs/image: analytic (conv+dense) {forward / 1e6:.2f} M ({layers_text}); "
          f"TF profiler {profiled_text}; training taken as 3x forward = {3 * forward / 1e6:.1f} M")
    train_flops_per_image = 3 * forward

    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in args.variants}
    peaks: list[float] = []
    # One model and one input per variant, trained one epoch at a time, variants alternating (order rotated
    # each round): on a shared machine, consecutive epochs of the variants see nearly the same load, so
    # their ratio is far steadier than that of whole fits run one after the other. Round 0 is the warm-up
    # epoch of every variant (tracing, first allocations) and is excluded.
    models = {variant: build_model(params, num_classes, steps, args.determinism) for variant in args.variants}
    epoch_s: dict[str, list[float]] = {variant: [] for variant in args.variants}
    epoch_cpu: dict[str, list[float]] = {variant: [] for variant in args.variants}
    for round_number in range(1 + args.repeats * timed_epochs):
        if round_number and (round_number - 1) % timed_epochs == 0:
            peaks.append(matmul_gflops(args.matmul_n))
        shift = round_number % len(args.variants)
        for variant in args.variants[shift:] + args.variants[:shift]:
            dataset, extra = make_input(variant, params, mmap_images, ram_images, labels, round_number)
            gc.collect()  # the previous fit's iterators go now, not during this timing
            timer = TrainTimer()
            models[variant].fit(dataset, epochs=1, verbose=0, shuffle=False, callbacks=[timer], **extra)
            seconds, cpu_seconds = timer.seconds, timer.cpu_seconds
            del dataset, timer
            if round_number == 0:
                print(f"  warm-up epoch {variant:<8} {seconds:6.1f} s (excluded)")
                continue
            epoch_s[variant].append(seconds)
            epoch_cpu[variant].append(cpu_seconds)
        if round_number and round_number % timed_epochs == 0:
            repeat = round_number // timed_epochs
            load = os.getloadavg()[0]
            for variant in args.variants:
                timed, cpu = epoch_s[variant][-timed_epochs:], epoch_cpu[variant][-timed_epochs:]
                images = timed_epochs * (steps * batch_size if variant == "constant" else len(labels))
                result = {"steps_per_s": timed_epochs * steps / sum(timed), "images_per_s": images / sum(timed),
                          "cpu_ms_per_step": 1000 * sum(cpu) / (timed_epochs * steps), "epoch_s": timed, "load": load}
                runs[variant].append(result)
                print(f"  repeat {repeat}/{args.repeats} {variant:<8} {result['steps_per_s']:6.2f} steps/s "
                      f"{result['images_per_s']:7.1f} img/s {result['cpu_ms_per_step']:7.1f} CPU-ms/step  "
                      f"(epochs {', '.join(f'{value:.2f}' for value in timed)} s; load {load:.1f})")
            print(f"  matmul {args.matmul_n}x{args.matmul_n} float32 in repeat {repeat}: {peaks[-1]:.1f} GFLOP/s")

    med = common.median
    peak_median, peak_best = med(peaks), max(peaks)
    rows = []
    for variant, results in runs.items():
        ips = med(r["images_per_s"] for r in results)
        achieved = ips * train_flops_per_image / 1e9
        rows.append([variant, med(r["steps_per_s"] for r in results), common.spread(r["steps_per_s"] for r in results),
                     med(r["cpu_ms_per_step"] for r in results), ips, achieved, f"{100 * achieved / peak_median:.1f}%", f"{100 * achieved / peak_best:.1f}%"])
    print(f"\n{name}: median of {args.repeats} repeats (training GFLOP/s = images/s x 3 x forward FLOPs; "
          f"matmul peak median {peak_median:.1f}, best {peak_best:.1f} GFLOP/s)")
    print(common.table(rows, ["variant", "steps/s", "range", "CPU ms/step", "img/s", "train GFLOP/s", "% of peak (median)",
                              "% of peak (best)"]))
    summary: dict[str, Any] = {"overrides": overrides, "image_size": size, "batch_size": batch_size,
                               "steps_per_epoch": steps, "timed_epochs": timed_epochs,
                               "forward_flops_analytic": forward, "forward_flops_profiler": profiled,
                               "forward_flops_per_layer": per_layer, "matmul_gflops": peaks, "runs": runs}
    if "mmap" in runs and "memory" in runs:
        mmap_rate = med(r["steps_per_s"] for r in runs["mmap"])
        memory_rate = med(r["steps_per_s"] for r in runs["memory"])
        paired = med(a["steps_per_s"] / b["steps_per_s"] for a, b in zip(runs["mmap"], runs["memory"]))
        ratio = mmap_rate / memory_rate
        cpu_ratio = (med(r["cpu_ms_per_step"] for r in runs["memory"])
                     / med(r["cpu_ms_per_step"] for r in runs["mmap"]))
        print(f"{name}: steps/s mmap / memory = {ratio:.3f} (paired per repeat: {paired:.3f}); target >= 0.95: "
              f"{'met' if ratio >= 0.95 else 'NOT met'}; by CPU time per step (memory / mmap): {cpu_ratio:.3f}")
        summary.update({"ratio_mmap_over_memory": ratio, "ratio_paired": paired, "cpu_ratio_memory_over_mmap": cpu_ratio})
    if "constant" in runs and "memory" in runs:
        constant_rate = med(r["steps_per_s"] for r in runs["constant"])
        summary["memory_over_constant"] = med(r["steps_per_s"] for r in runs["memory"]) / constant_rate
        print(f"{name}: memory / constant (input work vs. none) = {summary['memory_over_constant']:.3f}")
    figures["configs"][name] = summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="repeats per variant (default 3; median reported)")
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per fit, default config (default 4)")
    parser.add_argument("--large-epochs", type=int, default=2, help="timed epochs per fit, large config (default 2)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--no-op-determinism", dest="determinism", action="store_false",
                        help="seed without tf.config.experimental.enable_op_determinism (the project enables it)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspaces")
    parser.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    parser.add_argument("--live", action="store_true",
                        help="run the checkout's code as it is on disk instead of a snapshot taken at start")
    args = parser.parse_args()

    for variable in common.UNSET:
        os.environ.pop(variable, None)
    common.quiet_tensorflow()
    scratch = Path(tempfile.mkdtemp(prefix="cassava-bench-input-"))
    common.select_code(args.live, scratch)  # before anything imports the project
    info = common.machine_info()
    common.print_machine(info)

    workspaces: dict[str, Path] = {}
    for name in args.configs:
        workspaces[name] = common.make_workspace(name, parent=str(scratch))
        seconds = common.prepare_data(workspaces[name], CONFIGS[name])
        print(f"{name}: data prepared in {workspaces[name]} ({seconds:.1f} s)")

    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    print(f"TensorFlow {tf.__version__}; intra-op threads {tf.config.threading.get_intra_op_parallelism_threads()} "
          f"(0 = all cores); op determinism {'on (as the project)' if args.determinism else 'OFF'}")
    figures: dict[str, Any] = {"machine": info, "determinism": args.determinism, "configs": {}}
    for name in args.configs:
        timed = args.epochs if name == "default" else args.large_epochs
        run_config(name, CONFIGS[name], workspaces[name], args, timed, figures)

    common.finish(figures, args.json, scratch, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
