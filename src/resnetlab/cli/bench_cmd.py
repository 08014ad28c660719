"""``resnetlab bench ...``: measurements on this machine (``bench infer``: inference backends side by side)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from resnetlab.cli.options import data_tool_config, fail

bench_app = typer.Typer(help="Benchmarks on this machine.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


@bench_app.command("infer")
def bench_infer(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint (.pt) or a run directory")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the full result as JSON")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch of the throughput measurement")] = 32,
    variants: Annotated[Optional[str], typer.Option("--variants", help="Comma-separated subset of: eager, eager_bf16_cl, compile, compile_bf16_cl, onnxruntime, onnxruntime_int8, torchscript, aoti, aoti_bf16, deployment, deployment_float32, deployment_bf16")] = None,
    latency_calls: Annotated[int, typer.Option("--latency-calls", help="Batch-1 calls timed per variant")] = 200,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved rounds (throughput is their median)")] = 5,
    threads: Annotated[Optional[int], typer.Option("--threads", help="Intra-op threads (default: all cores)")] = None,
    calibration_data: Annotated[Optional[str], typer.Option("--calibration-data", help="Dataset spec for the int8 variant (default: the training data)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the JSON result to this file")] = None,
) -> None:
    """Batch-1 latency (p50/p99) and batch throughput of eager, bf16/channels_last, torch.compile, ONNX Runtime
    (float32 and int8) and the default deployment path, measured side by side in one run."""
    from resnetlab.cli.render import print_table
    from resnetlab.bench.infer import DEFAULT_VARIANTS, bench_infer as run_bench
    from resnetlab.utils.io import write_json

    chosen = tuple(v.strip() for v in variants.split(",") if v.strip()) if variants else DEFAULT_VARIANTS
    if not chosen:
        fail("--variants is empty")
    report = run_bench(checkpoint, variants=chosen, batch_size=batch_size, latency_calls=latency_calls,
                       rounds=rounds, threads=threads, calibration_data=calibration_data,
                       log=lambda m: typer.echo(m, err=True))
    if out is not None:
        write_json(out, report)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    ratios = report["ratios_to_eager"]
    rows = []
    for v in report["variants"]:
        if v["skipped"]:
            rows.append([v["name"], "skipped: " + v["skipped"][:100]] + [""] * 7)
            continue
        ratio = ratios.get(v["name"], {})
        accuracy = v["accuracy"]
        note = f"{accuracy['top1_change']:+.4f} ({accuracy['evaluated_on']})" if accuracy else ""
        diff, relative = v["max_abs_probability_difference"], v["max_relative_logit_difference"]
        rows.append([v["name"], f"{v['setup_seconds']:.1f}", f"{v['latency_ms_p50']:.3f}", f"{v['latency_ms_p99']:.3f}",
                     f"{v['throughput']:.1f}",
                     f"{ratio['latency_speedup']:.2f}x ({ratio['latency_speedup_best']:.2f}x)" if ratio else "",
                     f"{ratio['throughput_speedup']:.2f}x ({ratio['throughput_speedup_best']:.2f}x)" if ratio else "",
                     "" if diff is None else f"{diff:.1e} / {relative:.1e}", note])
    env = report["environment"]
    print_table(f"{report['model']} at {report['input_size']}px, batch {report['batch_size']}, {env['threads']} "
                f"thread(s); load average {env['load_average_start'][0]:.2f} -> {env['load_average_end'][0]:.2f}",
                ["variant", "setup s", "b1 p50 ms", "b1 p99 ms", f"img/s @{report['batch_size']}",
                 "latency vs eager (best round)", "throughput vs eager (best)", "vs eager: max |dp| / rel. logits", "int8 top-1 change"],
                rows)


@bench_app.command("train")
def bench_train_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (see `resnetlab models`)")] = "resnet20",
    input_size: Annotated[int, typer.Option("--input-size", "-s", help="Square input side in pixels")] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch size (the recipes use 128 at 32-64 px)")] = 128,
    num_classes: Annotated[int, typer.Option("--num-classes", help="Classifier outputs (43: GTSRB)")] = 43,
    repeats: Annotated[int, typer.Option("--repeats", help="Alternating timed rounds; medians are reported")] = 5,
    seconds: Annotated[float, typer.Option("--seconds", help="Minimum seconds of the reference loop per round")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (images/s of both loops and their ratio)")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the JSON result to this file")] = None,
) -> None:
    """resnetlab's training step (default settings) against a plain float32 NCHW eager loop, side by side."""
    from resnetlab.bench.train import bench_train
    from resnetlab.utils.io import write_json

    if min(input_size, batch_size, repeats) < 1 or seconds <= 0:
        fail("--input-size, --batch-size, --repeats and --seconds must be positive")
    result = bench_train(model, input_size, batch_size, num_classes=num_classes, repeats=repeats,
                         min_seconds=seconds, log=lambda m: typer.echo(m, err=True))
    if out is not None:
        write_json(out, result)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    ours, ref = result["resnetlab"], result["reference"]
    typer.echo(f"{model} @ {input_size}px, batch {batch_size}, {result['threads']} thread(s)\n"
               f"  resnetlab : {ours['images_per_second']:8.1f} img/s  ({ours['precision']}, channels_last "
               f"{ours['channels_last']}; {ours['gflops']:.0f} GFLOP/s = {ours['fraction_of_peak']:.0%} of the "
               f"measured {ours['peak_gflops']:.0f})\n"
               f"  reference : {ref['images_per_second']:8.1f} img/s  (fp32, NCHW, eager; {ref['gflops']:.0f} GFLOP/s = "
               f"{ref['fraction_of_peak']:.0%} of the measured {ref['peak_gflops']:.0f})\n"
               f"  ratio     : {result['ratio']:.2f}x")


@bench_app.command("data")
def bench_data_command(
    data: Annotated[str, typer.Option("--data", "-d", help="Dataset spec, e.g. gtsrb:PATH")],
    recipe: Annotated[Optional[str], typer.Option("--recipe", "-r", help="Recipe whose pipeline and model to time")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="[KEY=VALUE]...", show_default=False)] = None,
    steps: Annotated[int, typer.Option("--steps", help="Training steps to time")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """The input pipeline's images/s against the model's consumption (the same measurement as `data profile`)."""
    from resnetlab.bench.pipeline import profile_pipeline

    cfg = data_tool_config(data, recipe, overrides)
    result = profile_pipeline(cfg, train_steps=steps, log=lambda m: typer.echo(m, err=True))
    record = result.to_dict()
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    typer.echo(f"pipeline {result.pipeline_images_per_second:,.0f} img/s ({result.pipeline}); training step "
               f"{result.train_images_per_second:,.0f} img/s; ratio {result.ratio:.1f}x: {result.verdict()}")
