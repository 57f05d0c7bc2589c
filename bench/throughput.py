"""Training throughput of the default model against this machine's roofline, and what op determinism, XLA
(`jit_compile`) and TensorFlow's thread pools change.

Two parts, in one run (the settings first, the limits after, so this process's TensorFlow threads do not
compete with the children):

1. Limits and the per-layer roofline (in this process), all per CPU-second (work / CPU time of the process):
   other people's jobs move wall-time rates two- to fourfold on a shared machine, CPU time much less. The
   compute peak is the float32 matmul rate (tf.linalg.matmul 2048 x 2048, median of five, each the best of
   three), or the best rate a convolution layer reaches alone if higher; the memory bandwidth is the better of
   a large elementwise add (TensorFlow `a + b` on 32 M floats: 3 x 128 MB moved) and numpy's copy. Batch-norm
   layers are also timed as TensorFlow's fused kernel, for comparison. For each layer of the default model
   (`tasks.model.build_classifier`, params.yaml), the FLOPs and bytes of one training step per image are
   counted from the layer shapes (model below), giving its arithmetic intensity and its roofline time
   max(FLOPs / peak, bytes / bandwidth): the layer is compute- or bandwidth-bound. The sum over the layers is
   the roofline bound of a training step. Each layer is also timed alone (forward + backward of that layer on
   a batch, in a tf.function, training mode), and the optimizer's update alone, so the measured step can be
   split into layers, optimizer and the rest (loss, metrics, Keras' step loop, input pipeline).

2. Settings (one fresh child process per run: op determinism and thread pools are process-wide and fixed once
   TensorFlow starts). Each child trains the project's model the project's way (`seed_everything`,
   `build_classifier`, `compile_classifier` with `train.deterministic` / `train.jit_compile`, `fit` on
   `tasks.prepared.batched_dataset`), on random uint8 images (throughput does not depend on pixel values):
   one warm-up epoch, then --epochs timed epochs (Keras epoch begin to end). Variants are interleaved, their
   order rotated every repeat; medians are reported, with CPU time per step (all threads of the child).

FLOP and byte model, per image, float32 (4 bytes), training = forward + backward:
  conv / dense   FLOPs 3 x 2·MACs (forward, gradient w.r.t. input, w.r.t. weights); bytes 3 x (input + output
                 + weights / batch): each of the three passes reads two of the tensors and writes the third.
                 The first conv needs no input gradient (nothing trainable before it): 2 x.
  batch norm     forward reads x twice (statistics, normalize) and writes y; backward reads dy and x twice and
                 writes dx: 7 n floats, ~13 n FLOPs.
  ReLU, dropout  forward reads x, writes y (dropout also its mask); backward reads dy and y / mask, writes dx.
  max-pool 2x2   forward reads n, writes n/4; backward reads n/4 (dy) + n (x), writes n.
  rescale        forward only (no gradient needed before the first conv): reads n, writes n.
Weights are counted once per batch (divided by the batch size). Activations of batch 32 at 64 px (8 MB per
layer) exceed the per-core L2 cache, so main-memory bandwidth is the relevant limit; a cache-sized figure
(8 MB arrays) is printed for reference.

    .venv/bin/python bench/throughput.py                                   # 64 and 128 px, all variants
    .venv/bin/python bench/throughput.py --sizes 64 --repeats 3 --epochs 3 --json bench/results/throughput.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The project code: the snapshot a parent benchmark hands its children, else this checkout.
sys.path.insert(1, os.environ.get("CASSAVA_BENCH_CODE") or str(Path(__file__).resolve().parent.parent))

import _common as common  # noqa: E402

# name -> (train.deterministic, train.jit_compile, intra-op threads, inter-op threads; 0 = TensorFlow's choice)
# Keras compiles with XLA only without op determinism (with it, jit_compile=True falls back to no XLA, with a
# warning), so XLA is measured with determinism off and compared with "nondeterministic".
VARIANTS: dict[str, tuple[bool, bool, int, int]] = {
    "default": (True, False, 0, 0),
    "nondeterministic": (False, False, 0, 0),
    "xla": (False, True, 0, 0),
    "threads-1-1": (True, False, 1, 1),
    "threads-2-1": (True, False, 2, 1),
    "threads-1-2": (True, False, 1, 2),
}
FLOAT_BYTES = 4


# ------------------------------------------------------------------------------------------------ child


def child_main(spec: dict[str, Any]) -> None:
    """Train the project's model with one variant's settings; print one JSON line with the epoch timings."""
    deterministic, jit_compile, intra, inter = VARIANTS[spec["variant"]]
    common.quiet_tensorflow()
    import numpy as np
    import tensorflow as tf

    if intra or inter:  # before the first op: TensorFlow fixes its thread pools when it starts
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    import keras

    from tasks.model import build_classifier
    from tasks.params import load_params
    from tasks.prepared import batched_dataset
    from tasks.train import compile_classifier, seed_everything

    params = load_params(spec["params_file"], [*spec["overrides"], f"train.deterministic={str(deterministic).lower()}",
                                               f"train.jit_compile={str(jit_compile).lower()}"])
    size, batch, count = params.data.image_size, params.train.batch_size, spec["images"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, count).astype(np.int32)
    steps = math.ceil(count / batch)
    epochs = 1 + spec["epochs"]

    seed_everything(params.train.seed, params.train.deterministic)
    model = build_classifier(params.model, size, 5, params.train.seed)
    compile_classifier(model, params.train, steps)

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []
            self.cpu_seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.seconds.append(time.perf_counter() - self.started)
            self.cpu_seconds.append(time.process_time() - self.cpu_started)

    timer = EpochTimer()
    load = os.getloadavg()[0]
    model.fit(batched_dataset(images, labels, batch, shuffle=True, seed=params.train.seed, epochs=range(epochs)),
              steps_per_epoch=steps, epochs=epochs, callbacks=[timer], verbose=0, shuffle=False)
    timed, cpu = timer.seconds[1:], timer.cpu_seconds[1:]  # the first epoch traces and compiles
    print("RESULT " + json.dumps({
        "variant": spec["variant"], "size": size, "load": load, "jit_compile": bool(model.jit_compile),
        "intra_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "epoch_s": timed, "warmup_s": timer.seconds[0],
        "images_per_s": count / common.median(timed), "cpu_ms_per_step": 1000 * common.median(cpu) / steps,
    }), flush=True)


# ------------------------------------------------------------------------------------------------ limits


def bandwidth_gbs(floats: int, repeats: int = 10) -> dict[str, float]:
    """TensorFlow a + b and numpy copy on arrays of `floats` float32: bytes read + written per second of wall
    time and per CPU-second."""
    import numpy as np
    import tensorflow as tf

    a = tf.random.stateless_uniform((floats,), seed=(1, 2))
    b = tf.random.stateless_uniform((floats,), seed=(3, 4))
    add = tf.function(lambda x, y: x + y)
    add(a, b).numpy()
    add_wall, add_cpu = best_seconds(lambda: add(a, b).numpy(), repeats)
    source, target = np.ones(floats, np.float32), np.empty(floats, np.float32)
    copy_wall, copy_cpu = best_seconds(lambda: np.copyto(target, source), repeats)
    moved_add, moved_copy = 3 * FLOAT_BYTES * floats / 1e9, 2 * FLOAT_BYTES * floats / 1e9
    return {"tf_add": moved_add / add_wall, "tf_add_per_cpu_s": moved_add / add_cpu,
            "copy": moved_copy / copy_wall, "copy_per_cpu_s": moved_copy / copy_cpu}


def best_seconds(run: Any, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds per call of `run`, each the best of three timings of `repeats` calls. CPU time (this
    process, all threads) is what the work costs whatever other jobs take of the cores meanwhile."""
    walls, cpus = [], []
    for _ in range(3):
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            run()
        walls.append((time.perf_counter() - started) / repeats)
        cpus.append((time.process_time() - cpu_started) / repeats)
    return min(walls), min(cpus)


def matmul_rates(n: int = 2048, repeats: int = 10) -> tuple[float, float]:
    """float32 matmul (tf.linalg.matmul n x n): (GFLOP/s of wall time, GFLOP per CPU-second)."""
    import tensorflow as tf

    a = tf.random.stateless_uniform((n, n), seed=(1, 2))
    b = tf.random.stateless_uniform((n, n), seed=(3, 4))
    product = tf.function(lambda x, y: tf.linalg.matmul(x, y))
    product(a, b).numpy()
    wall, cpu = best_seconds(lambda: product(a, b).numpy(), repeats)
    return 2 * n**3 / wall / 1e9, 2 * n**3 / cpu / 1e9


def layer_costs(model: Any, batch: int) -> list[dict[str, Any]]:
    """Per layer of the model: training FLOPs and bytes per image (the model in the module docstring)."""
    import keras

    rows = []
    trainable_before = False
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        n_in = math.prod(layer.input.shape[1:])
        n_out = math.prod(layer.output.shape[1:])
        weights = sum(math.prod(w.shape) for w in layer.trainable_weights) / batch
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            if isinstance(layer, keras.layers.Conv2D):
                kh, kw, c_in, c_out = layer.kernel.shape
                macs = n_out * kh * kw * c_in
            else:
                macs = math.prod(layer.kernel.shape)
            passes = 3 if trainable_before else 2
            flops, floats = passes * 2.0 * macs, passes * (n_in + n_out + weights)
        elif isinstance(layer, keras.layers.BatchNormalization):
            flops, floats = 13.0 * n_in, 7.0 * n_in + 3 * weights
        elif isinstance(layer, keras.layers.MaxPooling2D):
            flops, floats = 2.0 * n_in, n_in + n_out + n_out + n_in + n_in
        elif isinstance(layer, keras.layers.Rescaling):
            flops, floats = float(n_in), float(n_in + n_out)
        elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
            flops, floats = 2.0 * n_in, n_in + n_out + n_out + n_in
        elif isinstance(layer, keras.layers.Dropout):
            flops, floats = 2.0 * n_in, 3.0 * n_in + 3.0 * n_out
        else:  # activations
            flops, floats = 2.0 * n_in, 2.0 * n_in + 3.0 * n_out
        rows.append({"layer": layer.name, "kind": type(layer).__name__, "flops": flops, "bytes": FLOAT_BYTES * floats,
                     "needs_input_gradient": trainable_before})
        trainable_before = trainable_before or bool(layer.trainable_weights)
    return rows


def time_layers(model: Any, rows: list[dict[str, Any]], batch: int, repeats: int) -> None:
    """Median seconds per batch of each layer alone: forward + the gradients a training step needs of it."""
    import tensorflow as tf

    by_name = {layer.name: layer for layer in model.layers}
    for row in rows:
        layer = by_name[row["layer"]]
        x = tf.random.stateless_uniform((batch, *layer.input.shape[1:]), seed=(5, 6), maxval=255.0)
        watch_input = row["needs_input_gradient"]

        def step(inputs: Any, layer: Any = layer, watch_input: bool = watch_input) -> Any:
            with tf.GradientTape() as tape:
                if watch_input:
                    tape.watch(inputs)
                out = layer(inputs, training=True)
                total = tf.reduce_sum(out)
            sources = ([inputs] if watch_input else []) + list(layer.trainable_weights)
            return tape.gradient(total, sources) if sources else [out]

        function = tf.function(step)
        row["measured_s"] = _median_call_seconds(function, x, repeats)
        if row["kind"] == "BatchNormalization":
            row["fused_s"] = _median_call_seconds(tf.function(fused_batch_norm_step(layer)), x, repeats)


def fused_batch_norm_step(layer: Any) -> Any:
    """The same batch normalization (training mode) as TensorFlow's fused kernel, forward + backward. Keras 3
    computes it unfused (tf.nn.moments, then tf.nn.batch_normalization: several passes each way)."""
    import tensorflow as tf

    def step(inputs: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out, _, _ = tf.compat.v1.nn.fused_batch_norm(inputs, layer.gamma, layer.beta, epsilon=layer.epsilon,
                                                        is_training=True)
            total = tf.reduce_sum(out)
        return tape.gradient(total, [inputs, layer.gamma, layer.beta])

    return step


def optimizer_seconds(model: Any, repeats: int) -> float:
    """Median seconds of one optimizer update of every trainable weight (gradients given)."""
    import tensorflow as tf

    gradients = [tf.ones_like(weight) * 1e-6 for weight in model.trainable_weights]
    apply = tf.function(lambda: model.optimizer.apply_gradients(zip(gradients, model.trainable_weights)))
    return _median_call_seconds(lambda _: apply(), None, repeats)


def _median_call_seconds(function: Any, argument: Any, repeats: int) -> float:
    """Median CPU seconds (this process, all threads) of one call, results fetched."""
    import tensorflow as tf

    for _ in range(3):
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, function(argument))
    times = []
    for _ in range(repeats):
        started = time.process_time()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, function(argument))
        times.append(time.process_time() - started)
    return common.median(times)


def roofline(params_file: Path, size: int, peak: float, bandwidth: float, repeats: int) -> dict[str, Any]:
    """The per-layer roofline of the default model at `size` px (peak and bandwidth per CPU-second, so the bounds
    are CPU-seconds), and each layer timed alone (CPU time)."""
    import tensorflow as tf

    from tasks.model import build_classifier
    from tasks.params import load_params
    from tasks.train import compile_classifier, seed_everything

    params = load_params(params_file, [f"data.image_size={size}"])
    batch = params.train.batch_size
    seed_everything(params.train.seed, params.train.deterministic)
    model = build_classifier(params.model, size, 5, params.train.seed)
    compile_classifier(model, params.train, 22)
    model.optimizer.build(model.trainable_weights)
    rows = layer_costs(model, batch)
    time_layers(model, rows, batch, repeats)
    # oneDNN's convolutions alone can do more FLOPs per CPU-second than the matmul measured: the higher of the two
    # is the peak (the stricter bound).
    conv_rate = max(batch * row["flops"] / row["measured_s"] / 1e9 for row in rows if row["kind"] == "Conv2D")
    peak = max(peak, conv_rate)
    for row in rows:
        row["intensity"] = row["flops"] / row["bytes"]
        compute_s, memory_s = row["flops"] / (peak * 1e9), row["bytes"] / (bandwidth * 1e9)
        row["bound_s_per_image"] = max(compute_s, memory_s)
        row["bound_by"] = "compute" if compute_s >= memory_s else "bandwidth"
    return {"batch": batch, "layers": rows, "peak_used": peak, "best_conv_gflop_per_cpu_s": conv_rate, "optimizer_s_per_batch": optimizer_seconds(model, repeats),
            "dispatch_s": _median_call_seconds(tf.function(lambda x: x + 1.0), tf.zeros(()), repeats),
            "conv_dense_flops_per_image": sum(r["flops"] for r in rows if r["kind"] in ("Conv2D", "Dense")),
            "bound_s_per_image": sum(r["bound_s_per_image"] for r in rows)}


# ------------------------------------------------------------------------------------------------ parent


def run_variants(args: argparse.Namespace, params_file: Path, scratch: Path) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {f"{size}/{name}": [] for size in args.sizes for name in args.variants}
    env = common.child_env(scratch, TQDM_DISABLE="1")
    for repeat in range(args.repeats):
        for size in args.sizes:
            order = args.variants[repeat % len(args.variants):] + args.variants[:repeat % len(args.variants)]
            for name in order:
                spec = {"variant": name, "params_file": str(params_file), "epochs": args.epochs,
                        "images": args.images * 64 // size if size > 64 else args.images,
                        "overrides": [f"data.image_size={size}"]}
                log_file = scratch / f"{size}-{name}-{repeat}.log"
                result = common.run_child([common.PYTHON, __file__, "--child", json.dumps(spec)], env, scratch, log_file)
                lines = [line for line in log_file.read_text().splitlines() if line.startswith("RESULT ")]
                if result.returncode != 0 or not lines:
                    print(f"  {size}px {name}: FAILED (exit {result.returncode}); {log_file}:\n"
                          + log_file.read_text()[-1500:])
                    continue
                figures = json.loads(lines[-1].removeprefix("RESULT "))
                figures["process_wall_s"], figures["process_cpu_s"] = result.wall_s, result.cpu_s
                runs[f"{size}/{name}"].append(figures)
                print(f"  repeat {repeat + 1} {size}px {name:17s} {figures['images_per_s']:7.1f} img/s, "
                      f"{figures['cpu_ms_per_step']:6.0f} CPU ms/step (XLA {'on' if figures['jit_compile'] else 'off'}; "
                      f"threads {figures['intra_threads']}/"
                      f"{figures['inter_threads']}; load {figures['load']:.1f})", flush=True)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant and size (median reported)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run, after one warm-up epoch")
    parser.add_argument("--images", type=int, default=704,
                        help="training images per epoch at 64 px (22 steps of 32); at larger sizes scaled down")
    parser.add_argument("--layer-repeats", type=int, default=20, help="timings per layer in the per-layer profile")
    common.add_output_options(parser)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return 0

    for variable in common.UNSET:
        os.environ.pop(variable, None)
    common.quiet_tensorflow()
    scratch = Path(tempfile.mkdtemp(prefix="cassava-bench-throughput-"))
    common.select_code(args.live, scratch)
    info = common.machine_info()
    common.print_machine(info)
    workspace = common.make_workspace("throughput", parent=str(scratch))
    params_file = workspace / "params.yaml"

    print(f"\n== settings: {len(args.variants)} variants x {args.repeats} repeats per size, 1 warm-up + {args.epochs} "
          f"timed epochs each, fresh process per run")
    runs = run_variants(args, params_file, workspace)

    import tensorflow as tf  # after the children: the parent's TensorFlow threads must not compete with them

    tf.get_logger().setLevel("ERROR")
    # Limits per CPU-second: other people's jobs take cores away at random moments, which moves wall-time rates
    # two- or threefold but hardly the work a CPU-second does. Training is compared in the same unit (CPU time
    # per step, all threads), so the share of the roofline does not depend on the load of the moment.
    matmuls = [matmul_rates() for _ in range(5)]
    peak = common.median(cpu for _, cpu in matmuls)
    large, cache = bandwidth_gbs(32 * 2**20), bandwidth_gbs(2 * 2**20)
    bandwidth = max(large["tf_add_per_cpu_s"], large["copy_per_cpu_s"])
    print(f"\n== limits (load {os.getloadavg()[0]:.1f}), per CPU-second: float32 matmul {peak:.1f} GFLOP (median of 5; "
          f"wall-time rate {common.median(w for w, _ in matmuls):.1f} GFLOP/s, best {max(w for w, _ in matmuls):.1f}); "
          f"bandwidth on 128 MB arrays: TF add {large['tf_add_per_cpu_s']:.1f} GB, numpy copy "
          f"{large['copy_per_cpu_s']:.1f} GB (used: {bandwidth:.1f}; wall-time rates {large['tf_add']:.1f} and "
          f"{large['copy']:.1f} GB/s); 8 MB arrays: {cache['tf_add_per_cpu_s']:.1f} and {cache['copy_per_cpu_s']:.1f} GB; "
          f"ridge point {peak / bandwidth:.1f} FLOP/byte")

    figures: dict[str, Any] = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "json"},
                               "matmul": matmuls, "bandwidth_128MB": large, "bandwidth_8MB": cache,
                               "peak_gflop_per_cpu_s": peak, "bandwidth_gb_per_cpu_s": bandwidth,
                               "runs": runs, "sizes": {}}
    for size in args.sizes:
        model = roofline(params_file, size, peak, bandwidth, args.layer_repeats)
        batch = model["batch"]
        default_runs = runs.get(f"{size}/default", [])
        measured_ips = common.median(r["images_per_s"] for r in default_runs)
        step_cpu_s = common.median(r["cpu_ms_per_step"] for r in default_runs) / 1e3
        bound_step_s = batch * model["bound_s_per_image"]
        train_flops = model["conv_dense_flops_per_image"]
        print(f"\n== {size} px, batch {batch}: per-layer roofline of a training step and each layer alone, in CPU-ms "
              f"per batch (bound = max(FLOPs / peak, bytes / bandwidth), per CPU-second; peak used "
              f"{model['peak_used']:.1f} GFLOP = max(matmul {peak:.1f}, best conv layer alone "
              f"{model['best_conv_gflop_per_cpu_s']:.1f}))")
        table = []
        for row in model["layers"]:
            table.append([row["layer"], row["kind"], row["flops"] / 1e6, row["bytes"] / 1e6, row["intensity"],
                          row["bound_by"], 1e3 * batch * row["bound_s_per_image"], 1e3 * row["measured_s"],
                          f"{100 * batch * row['bound_s_per_image'] / row['measured_s']:.0f}%",
                          1e3 * row["fused_s"] if "fused_s" in row else "-"])
        print(common.table(table, ["layer", "kind", "MFLOP/img", "MB/img", "FLOP/B", "bound by", "bound",
                                   "alone", "bound / alone", "fused BN"]))
        # Each layer timed alone pays one tf.function call; a training step pays one for all of them.
        layers_s = sum(row["measured_s"] - model["dispatch_s"] for row in model["layers"])
        optimizer_s = model["optimizer_s_per_batch"]
        print(f"{size} px: training step (default settings) {1e3 * step_cpu_s:.1f} CPU-ms per batch of {batch} against "
              f"a roofline bound of {1e3 * bound_step_s:.1f}: {100 * bound_step_s / step_cpu_s:.1f}% of the bound; conv + "
              f"dense {train_flops / 1e6:.1f} MFLOP/image = {batch * train_flops / step_cpu_s / 1e9:.1f} GFLOP per CPU-second "
              f"= {100 * batch * train_flops / step_cpu_s / 1e9 / model['peak_used']:.1f}% of the peak")
        print(f"{size} px: step {1e3 * step_cpu_s:.1f} CPU-ms = layers alone {1e3 * layers_s:.1f} (less "
              f"{1e3 * model['dispatch_s']:.2f} call overhead each) + optimizer update {1e3 * optimizer_s:.1f} + rest "
              f"(loss, metrics, step loop, input pipeline) {1e3 * (step_cpu_s - layers_s - optimizer_s):.1f}")
        print(f"{size} px: wall time under this load: {measured_ips:.0f} img/s (2 cores free would allow up to "
              f"{2 * batch / step_cpu_s:.0f} img/s at this CPU cost)")
        model.update({"measured_images_per_s": measured_ips, "step_cpu_s": step_cpu_s, "bound_step_s": bound_step_s,
                      "layers_alone_s": layers_s})
        figures["sizes"][str(size)] = model

        rows = []
        base = common.median(r["cpu_ms_per_step"] for r in default_runs)
        for name in args.variants:
            results = runs[f"{size}/{name}"]
            cpu_ms = common.median(r["cpu_ms_per_step"] for r in results)
            rows.append([name, cpu_ms, common.spread(r["cpu_ms_per_step"] for r in results), base / cpu_ms,
                         f"{100e3 * bound_step_s / cpu_ms:.0f}%", common.median(r["images_per_s"] for r in results),
                         common.spread(r["images_per_s"] for r in results),
                         common.median(r["warmup_s"] for r in results)])
        print(f"\n{size} px: settings, median of {args.repeats} (speed-up = default's CPU-ms per step / the variant's)")
        print(common.table(rows, ["variant", "CPU-ms/step", "range", "speed-up", "% of roofline", "img/s (wall)",
                                  "range", "warm-up epoch s"]))

    common.finish(figures, args.json, scratch, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
