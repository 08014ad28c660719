"""``resnetlab bench ...``: measurements on this machine (``bench infer``: inference backends side by side)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

bench_app = typer.Typer(help="Benchmarks on this machine.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


@bench_app.command("infer")
def bench_infer(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint (.pt) or a run directory")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the full result as JSON")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch of the throughput measurement")] = 32,
    variants: Annotated[Optional[str], typer.Option("--variants", help="Comma-separated subset of: eager, eager_bf16_cl, compile, compile_bf16_cl, onnxruntime, onnxruntime_int8, torchscript, deployment")] = None,
    latency_calls: Annotated[int, typer.Option("--latency-calls", help="Batch-1 calls timed per variant")] = 200,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved rounds (throughput is their median)")] = 5,
    threads: Annotated[Optional[int], typer.Option("--threads", help="Intra-op threads (default: all cores)")] = None,
    calibration_data: Annotated[Optional[str], typer.Option("--calibration-data", help="Dataset spec for the int8 variant (default: the training data)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the JSON result to this file")] = None,
) -> None:
    """Batch-1 latency (p50/p99) and batch throughput of eager, bf16/channels_last, torch.compile, ONNX Runtime
    (float32 and int8) and the default deployment path, measured side by side in one run."""
    from resnetlab.cli.main import fail
    from resnetlab.cli.render import print_table
    from resnetlab.deployment.bench import DEFAULT_VARIANTS, bench_infer as run_bench
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
            rows.append([v["name"], "skipped: " + v["skipped"][:80]] + [""] * 7)
            continue
        ratio = ratios.get(v["name"], {})
        accuracy = v["accuracy"]
        note = (f"top-1 {accuracy['top1_change']:+.4f} ({accuracy['evaluated_on']})" if accuracy else "")
        diff = v["max_abs_probability_difference"]
        rows.append([v["name"], f"{v['setup_seconds']:.1f}", f"{v['latency_ms_p50']:.3f}", f"{v['latency_ms_p99']:.3f}",
                     f"{v['throughput']:.1f}", f"{ratio.get('latency_speedup', float('nan')):.2f}x",
                     f"{ratio.get('throughput_speedup', float('nan')):.2f}x",
                     "" if diff is None else f"{diff:.1e}", note])
    env = report["environment"]
    print_table(f"{report['model']} at {report['input_size']}px, batch {report['batch_size']}, {env['threads']} "
                f"thread(s); load average {env['load_average_start'][0]:.2f} -> {env['load_average_end'][0]:.2f}",
                ["variant", "setup s", "b1 p50 ms", "b1 p99 ms", f"img/s @{report['batch_size']}",
                 "latency vs eager", "throughput vs eager", "max |dp| vs eager", "int8 accuracy change"], rows)
