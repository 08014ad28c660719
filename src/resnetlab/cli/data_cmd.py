"""``resnetlab data ...``: dataset tools (inspect, stats, split, profile, synth, formats)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from resnetlab.cli.options import data_tool_config, fail

data_app = typer.Typer(help="Dataset tools: inspect a dataset, channel statistics, split class folders, profile "
                            "the input pipeline, generate the synthetic set.", no_args_is_help=True)

OVERRIDES_HELP = "Config overrides with dotted keys, e.g. data.input_size=64 data.classes=[2,3]"


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


def _echo_err(message: str) -> None:
    typer.echo(message, err=True)


@data_app.command("formats")
def data_formats() -> None:
    """List the dataset formats --data accepts."""
    from resnetlab.data.formats import dataset_formats

    for prefix, help_text in dataset_formats().items():
        typer.echo(f"{prefix}{'' if prefix == 'synthetic-signs' else ':PATH'}\t{help_text}")


@data_app.command("inspect")
def data_inspect(
    spec: Annotated[str, typer.Argument(help="Dataset spec, e.g. gtsrb:PATH, folder:PATH, csv:FILE, cifar10:PATH")],
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="[KEY=VALUE]...", help=OVERRIDES_HELP, show_default=False)] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", "-r", help="Look at the data as this recipe would (splits, input size)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write inspect.json, samples_per_class.png (and bad_images.csv) here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    samples: Annotated[int, typer.Option("--samples", help="Samples per class in the grid")] = 8,
) -> None:
    """Images per class and split, image sizes, imbalance, groups, unusable files, and a grid of samples per class."""
    from resnetlab.cli.render import print_table
    from resnetlab.data.inspect import inspect_dataset

    cfg = data_tool_config(spec, recipe, overrides)
    result = inspect_dataset(cfg, out_dir=out, samples_per_class=samples, log=_echo_err)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    sizes = result["image_sizes"]
    typer.echo(f"{result['spec']}: {result['images']} images, {result['num_classes']} classes; split "
               f"{result['split_strategy']} (val: {result['split_sources'].get('val')}; test: "
               f"{result['split_sources'].get('test')})")
    print_table("images per class", ["index", "id", "name", "train", "val", "test", "total"],
                [[c["index"], c["id"], c["name"], c["train"], c["val"], c["test"], c["total"]] for c in result["classes"]])
    split_sizes = ", ".join(f"{k} {v}" for k, v in result["split_sizes"].items())
    typer.echo(f"splits: {split_sizes}")
    typer.echo(f"imbalance ratio (largest / smallest class): train {result['imbalance_ratio']}, "
               f"all splits {result['imbalance_ratio_all']}")
    if result["group_kind"]:
        typer.echo(f"groups ({result['group_kind']}): " + ", ".join(f"{k} {v}" for k, v in result["groups"].items()))
    else:
        typer.echo("groups: none (samples are split independently)")
    if sizes.get("width"):
        typer.echo(f"image width {sizes['width']}, height {sizes['height']}, aspect {sizes['aspect_ratio']}")
        typer.echo("shorter side: " + ", ".join(f"{k}: {v}" for k, v in sizes["shorter_side_histogram"].items() if v))
        typer.echo(f"modes {sizes['modes']}, formats {sizes['formats']}")
    if "roi_width" in sizes:
        typer.echo(f"ROI width {sizes['roi_width']}, height {sizes['roi_height']}")
    for note in result["notes"]:
        typer.echo(f"note: {note}")
    problems = result["problems"]
    if problems:
        typer.echo(f"{len(problems)} problem(s):")
        for item in problems[:20]:
            typer.echo(f"  [{item['split']}] {item['path']}: {item['reason']}")
        if len(problems) > 20:
            typer.echo(f"  ... and {len(problems) - 20} more" + (" (all in bad_images.csv)" if out else " (--out DIR lists all)"))
    else:
        typer.echo("no unusable samples found (file headers read; a run decodes every file before training)")
    if out:
        typer.echo(f"wrote {', '.join(result['files'].values())}")


@data_app.command("stats")
def data_stats(
    spec: Annotated[str, typer.Argument(help="Dataset spec, e.g. gtsrb:PATH")],
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="[KEY=VALUE]...", help=OVERRIDES_HELP, show_default=False)] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", "-r", help="Use this recipe's split and input size")] = None,
    per_class: Annotated[bool, typer.Option("--per-class", help="Also mean and std of each class")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Per-channel mean and std of the training split (what data.normalize=dataset uses), cached by fingerprint."""
    from resnetlab.cli.render import print_table
    from resnetlab.data.stats import compute_dataset_stats

    cfg = data_tool_config(spec, recipe, overrides)
    stats = compute_dataset_stats(cfg, per_class=per_class, log=_echo_err)
    if as_json:
        typer.echo(json.dumps(stats.to_dict(), indent=2))
        return
    o = stats.overall
    scope = f"a seeded sample of {o.images}" if stats.sampled else f"all {o.images}"
    typer.echo(f"{stats.spec}: training split ({stats.split}), {scope} of {stats.train_images} images at "
               f"{stats.input_size} px ({stats.resize}{', ROI-cropped' if stats.roi_crop else ''})")
    typer.echo(f"mean {_triple(o.mean)}\nstd  {_triple(o.std)}")
    if stats.per_class:
        print_table("per class", ["index", "id", "name", "images", "mean (R, G, B)", "std (R, G, B)"],
                    [[c["index"], c["id"], c["name"], c["images"], _triple(c["mean"]), _triple(c["std"])]
                     for c in stats.per_class])


def _triple(values) -> str:
    return "-" if values is None else "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


@data_app.command("split")
def data_split(
    src: Annotated[Path, typer.Argument(help="A folder with one sub-folder per class")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder to write train/ and test/ into")],
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Share of each class that goes to test/")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Shuffling seed")] = 0,
) -> None:
    """Split class folders per class into OUT/train and OUT/test (hard links where possible, else copies)."""
    from resnetlab.data.split_folders import split_class_folders

    result = split_class_folders(src, out, test_fraction=test_fraction, seed=seed)
    train = sum(c["train"] for c in result.counts.values())
    test = sum(c["test"] for c in result.counts.values())
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    how = f"{result.linked} hard-linked" + (f", {result.copied} copied" if result.copied else "")
    typer.echo(f"{len(result.counts)} classes: train {train}, test {test} images ({how}) -> {result.out}")


@data_app.command("profile")
def data_profile(
    data: Annotated[str, typer.Option("--data", "-d", help="Dataset spec, e.g. gtsrb:PATH")],
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="[KEY=VALUE]...", help=OVERRIDES_HELP, show_default=False)] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", "-r", help="Recipe whose pipeline and model to time (default: the config defaults, ResNet-20 at 32 px)")] = None,
    files: Annotated[int, typer.Option("--files", help="Training files to time the per-file stages on")] = 256,
    batches: Annotated[int, typer.Option("--batches", help="Batches to time the batch stages on")] = 20,
    steps: Annotated[int, typer.Option("--steps", help="Training steps to time")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Time each pipeline stage (read, decode, crop, augment, collate) against the model's training step."""
    from resnetlab.cli.render import print_table
    from resnetlab.bench.pipeline import profile_pipeline

    if min(files, batches, steps) < 1:
        fail("--files, --batches and --steps must be at least 1")
    cfg = data_tool_config(data, recipe, overrides)
    result = profile_pipeline(cfg, files=files, batches=batches, train_steps=steps, log=_echo_err)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    print_table(f"{result.spec} at {result.input_size} px, {result.pipeline} pipeline, batch {result.batch_size}",
                ["stage", "µs / image", "images / s", "what"],
                [[s.name, f"{s.microseconds_per_image:,.1f}", f"{s.images_per_second:,.0f}", s.note] for s in result.stages])
    if result.one_off_images_per_second is not None:
        typer.echo(f"read + decode + crop run once (then cached on disk): {result.one_off_images_per_second:,.0f} img/s "
                   "on one thread")
    typer.echo(f"pipeline: {result.pipeline_images_per_second:,.0f} img/s; training step ({result.model}, "
               f"{result.conditions['precision']}, channels_last {result.conditions['channels_last']}): "
               f"{result.train_images_per_second:,.0f} img/s")
    typer.echo(f"ratio {result.ratio:.1f}x: {result.verdict()}")
    c = result.conditions
    typer.echo(f"conditions: {c['cpu_count']} CPU(s), {c['torch_threads']} torch thread(s), load average "
               f"{c['load_average']}, device {c['device']}, torch {c['torch']}, {c['time']}")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (GTSRB Kaggle layout)")],
    per_class: Annotated[int, typer.Option("--per-class", help="Training images per class")] = 300,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="Processes to draw with")] = 1,
) -> None:
    """Generate the synthetic traffic-sign set (deterministic for a seed)."""
    from resnetlab.data.synthetic import generate_synthetic_signs

    if per_class < 1:
        fail("--per-class must be at least 1")
    path = generate_synthetic_signs(out, per_class=per_class, seed=seed, workers=workers)
    typer.echo(str(path))


@data_app.command("sample")
def data_sample(
    spec: Annotated[str, typer.Argument(help="Labelled dataset spec, e.g. csv:FILE, folder:PATH, gtsrb:PATH, synthetic-signs")],
    per_class: Annotated[int, typer.Option("--per-class", "-k", help="Training images (shots) per class")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write fewshot.csv, rest.csv and sample.json into")],
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="[KEY=VALUE]...", help=OVERRIDES_HELP, show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the draw (same seed and data: same draw)")] = 0,
    split_test: Annotated[bool, typer.Option("--split-test", help="Also write split.csv: both manifests in one, with a Split column (fewshot rows train, rest rows test), for one run that trains on the shots and tests on the rest (with data.val_fraction=0)")] = False,
    group_pattern: Annotated[Optional[str], typer.Option("--group-pattern", help="Regular expression whose first capture group in a file name is its group (track), for data whose groups are only in the names, e.g. '^(.*)_\\d+\\.\\w+$'")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Draw K labelled images per class (stratified, seeded; shots from distinct tracks/groups, none of whose images
    reach the test set) into DIR/fewshot.csv, and every other image into DIR/rest.csv; both are csv: specs."""
    from resnetlab.data.datasets import open_dataset
    from resnetlab.data.sampling import sample_few_shot

    if per_class < 1:
        fail("--per-class must be at least 1")
    cfg = data_tool_config(spec, None, overrides)
    source = open_dataset(cfg.data)
    result = sample_few_shot(source, out, per_class, seed=seed, split_test=split_test, group_pattern=group_pattern,
                             log=None if as_json else _echo_err)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    short = result.short_classes
    typer.echo(f"{result.spec}: {len(result.classes)} classes, {per_class} shot(s) per class (seed {seed}): "
               f"fewshot {result.fewshot_images}, rest {result.rest_images} images"
               + (f", {result.excluded_images} left out as frames of the drawn {result.group_kind or 'group'}s "
                  "(excluded.csv)" if result.excluded_images else ""))
    if short:
        typer.echo(f"{len(short)} class(es) with fewer than {per_class} shots: "
                   + ", ".join(f"{c['id']} ({c['fewshot']})" for c in short[:12]) + (" ..." if len(short) > 12 else ""))
    typer.echo("wrote " + ", ".join(str(p) for p in result.files.values()))
    if "split" in result.files:
        typer.echo(f"train on the shots and test on the rest in one run: resnetlab train --data "
                   f"csv:{result.files['split']} data.val_fraction=0 ...")
    else:
        typer.echo(f"train: resnetlab train --data csv:{result.files['fewshot']} ...; "
                   f"test: resnetlab evaluate RUN --data csv:{result.files['rest']}")
