"""Turning a benchmark record (a dict, see harness.run_benchmark) into JSON, markdown and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

from zone_engine.paths import written_atomically
from zone_engine.pipeline import STAGES

from .options import report_paths

COLUMNS = (*STAGES[:4], "per_step", *STAGES[4:], "total")
# The engine rows' layout as --channels-last set it (BenchConfig.channels_last); `layout` says the default's.
LAYOUTS = {True: " (UNets and VAE channels-last)", False: " (contiguous layout)"}


def layout(config: dict) -> str:
    """The engine rows' layout: as --channels-last set it, else the default's outcome on the run's device."""
    if config.get("channels_last") is not None:
        return LAYOUTS[config["channels_last"]]
    default = {True: "the UNets channels-last", False: "contiguous",
               None: "the UNets channels-last on CUDA in fp16/bf16"}[config.get("unets_channels_last")]
    return f" (default layout: {default})"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} µs"


def format_bytes(count: int | None) -> str:
    return "–" if count is None else f"{count / 2**30:.2f} GiB"


def _cell(stats: dict) -> str:
    if stats["n"] > 1:
        return f"{format_seconds(stats['median'])} [{format_seconds(stats['min'])}–{format_seconds(stats['max'])}]"
    return format_seconds(stats["median"])


def _parity_line(parity: dict | None) -> str:
    if parity is None:
        return "fp32 parity: no engine row ran in fp32."
    if "failed" in parity:
        return f"fp32 parity ({parity['name']}): {parity['failed']}."
    return (f"fp32 parity ({parity['name']}): max pixel difference {parity['max_pixel_diff_image']} (image), "
            f"{parity['max_pixel_diff_styled']} (styled); IoU M_b {parity['iou_mask_b']:.4f}, "
            f"M_f {parity['iou_mask_f']:.4f}.")


def markdown(record: dict) -> str:
    """The report as markdown: setup, per-stage latency, batched throughput, output agreement, floor."""
    lines = [*setup_lines(record), *stage_table(record), *batched_table(record), *agreement_table(record),
             *floor_lines(record)]
    return "\n".join(lines) + "\n"


def setup_lines(record: dict) -> list[str]:
    """The title and what ran where: time, machine, versions, models, settings."""
    config, machine = record["config"], record["machine"]
    batch = config.get("batch", 1)  # records older than the batched measurement have none
    batches = f", then {config['repeats']} timed batches of {batch} per batching backend" if batch > 1 else ""
    return [
        f"# zone bench: {config['preset']}",
        "",
        f"- finished (UTC): {record['created_utc']}; wall time of the whole run {format_seconds(record['wall_s'])} "
        f"(model build {format_seconds(record['model_build_s'])}); 1-min load average "
        f"{record['load_average_1min']['before']:.2f} before, {record['load_average_1min']['after']:.2f} after",
        f"- machine: {machine['cpu_model']}, {machine['cpu_cores']} cores (torch threads {machine['torch_threads']}); "
        f"device {machine['device']} ({machine['device_name']})",
        f"- versions: torch {machine['torch']} (built for CUDA {machine['cuda']}), diffusers {machine['diffusers']}, "
        f"transformers {machine['transformers']}, segment-anything {machine['segment-anything']}",
        f"- models: {config['models']} architectures with random weights, SAM {config['sam_type']}; "
        f"image {config['resolution']}², {config['steps']} steps, engine dtype {config['dtype']}"
        f"{layout(config)}, baseline fp32; "
        f"SAM {config['sam']['points_per_side']}² points, pred_iou_thresh {config['sam']['pred_iou_thresh']}, "
        f"stability_score_thresh {config['sam']['stability_score_thresh']}",
        *_group_norm_lines(record),
        f"- warm-up edits {config['warmup']} ({config['priming']}), timed edits {config['repeats']}{batches}; "
        f"action forced to {config['action']} (classification timed beside each edit)",
        *([f"- rounds: {config['rounds']}"] if "rounds" in config else []),  # records from before it: none
        *([f"- **cut short**: {record['cut_short']}; no edit or batch started after it, so rows may have fewer "
           "timed edits than asked (their count is `n` in the JSON) and rows without one are listed as skipped"]
          if record.get("cut_short") else []),
    ]


def _group_norm_lines(record: dict) -> list[str]:
    """Whose GroupNorms each engine row ran (kernel 3 or PyTorch's), which --group-norm alone does not say."""
    rows = {run["name"]: run["group_norms"] for run in record["runs"] if "group_norms" in run}
    if not rows:  # records from before rows said it
        return []
    said = "; ".join(f"{name} UNets {norms['unets']}, VAE {norms['vae']}" for name, norms in rows.items())
    return [f"- GroupNorms (--group-norm {record['config'].get('group_norm', 'auto')}): {said}"]


def stage_table(record: dict) -> list[str]:
    """Per-stage medians and spreads of every row (a skipped row says why), speed-up, memory, edits/s."""
    lines = [
        "",
        "## Per-stage latency (median; [min–max] over the timed edits, per_step's over all their steps)",
        "",
        "| implementation | " + " | ".join(COLUMNS) + " | speed-up | peak memory | edits/s |",
        "|" + "---|" * (len(COLUMNS) + 4),
    ]
    for run in record["runs"]:
        if "skipped" in run:
            lines.append(f"| {run['name']} | skipped: {run['skipped']} |")
            continue
        cells = [_cell(run["stages"][column] if column != "per_step" else run["per_step"]) for column in COLUMNS]
        speedup = record["speedup"].get(run["name"])
        lines.append(
            f"| {run['name']} ({run['dtype']}) | " + " | ".join(cells)
            + f" | {'–' if speedup is None else f'{speedup:.2f}×'} | {format_bytes(run['peak_memory']['bytes'])}"
            + f" | {run['throughput']['edits_per_s']:.3g} |"
        )
    first = next(run for run in record["runs"] if "skipped" not in run)
    return lines + [
        "",
        "Speed-up: baseline total median ÷ row total median. The stages' medians need not add up to the total's: "
        "an edit's total also holds work in no stage (reading and resizing the image; the baseline's attention "
        f"store put on and taken off its UNet). Peak memory: {first['peak_memory']['label']}. "
        f"edits/s: {first['throughput']['label']}. per_step: {first['per_step_source']}.",
    ]


def agreement_table(record: dict) -> list[str]:
    """Every row's output against the baseline's (same seed), then the fp32 parity line."""
    lines = [
        "",
        "## Output agreement with the baseline (same seed, same inputs)",
        "",
        "| implementation | dtype | max px diff (image) | max px diff (styled) | IoU M_b | M_b identical "
        "| IoU M_f | IoU R | SAM fallback (row / baseline) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, quality in record["quality"].items():
        lines.append(
            f"| {name} | {quality['dtype']} | {quality['max_pixel_diff_image']} | {quality['max_pixel_diff_styled']} "
            f"| {quality['iou_mask_b']:.4f} | {quality['mask_b_identical']} | {quality['iou_mask_f']:.4f} "
            f"| {quality['iou_region']:.4f} | {quality['used_fallback']} / {quality['baseline_used_fallback']} |"
        )
    fell_back = [name for name, quality in record["quality"].items()
                 if quality["used_fallback"] and quality["baseline_used_fallback"]]
    if fell_back:  # M_f = M_b on both sides: the IoU of 1 says nothing of SAM's segments
        lines += ["", f"{', '.join(fell_back)} and the baseline all fell back to M_b (no SAM segment chosen): their "
                  "IoU M_f compares M_b with M_b, so SAM's segments (a reduced-precision SAM's borders among them) "
                  "were not compared."]
    return lines + ["", _parity_line(record["parity"])]


def floor_lines(record: dict) -> list[str]:
    """The denoise stage's cost-model floor at each measured ceiling, and each row's distance from it."""
    floor, failed = record.get("floor"), record.get("floor_error")
    if not floor and not failed:  # a record from before floor_error
        return []
    lines = ["", "## Cost-model floor of the denoise stage", ""]
    if not floor:
        return [*lines, f"Not computed: {failed}."]
    lines += [
        f"UNet {floor['unet_gflop_per_row']:.4g} GFLOP per row × {floor['rows_per_step']} rows × "
        f"{record['config']['steps']} steps = {floor['denoise_tflop']:.4g} TFLOP.",
    ]
    for ceiling in floor["ceilings"]:
        gaps = ", ".join(f"{name} {gap:.1f}×" for name, gap in ceiling["gap"].items())
        measured = ceiling["measured_flops_per_s"]
        when = ("measured before the edits only: the run was cut short" if measured["after"] is None else
                f"best of {measured['before'] / 1e12:.3g} before the edits and {measured['after'] / 1e12:.3g} after")
        lines.append(
            f"- measured {ceiling['dtype']} matmul {ceiling['flops_per_s'] / 1e12:.3g} TFLOP/s ({when}) → "
            f"floor {format_seconds(ceiling['denoise_floor_s'])} per edit "
            f"({format_seconds(ceiling['step_floor_s'])} per step); denoise measured / floor: {gaps}"
        )
    return lines


def batched_table(record: dict) -> list[str]:
    """"Throughput: sequential vs batched" (markdown lines), when the run timed batches (`--batch N` > 1)."""
    rows = [run for run in record["runs"] if "batched_throughput" in run]
    if not rows:
        return []
    batch = rows[0]["batched_throughput"]["batch"]
    lines = [
        "",
        f"## Throughput: sequential vs batched (batches of {batch} concurrent edits)",
        "",
        "| implementation | sequential edits/s | batched edits/s | wall per batch | batched step | "
        "speed-up vs sequential | peak memory (batched) | first edit vs sequential: max px diff (image / styled) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    label = None
    for run in rows:
        batched, sequential = run["batched_throughput"], run["throughput"]["edits_per_s"]
        head = f"| {run['name']} ({run['dtype']}) | {sequential:.3g} |"
        if "not_applicable" in batched:
            lines.append(f"{head} not applicable: {batched['not_applicable']} |")
            continue
        label = batched["label"]
        if batched["edits_per_s"] is None:
            lines.append(f"{head} {batched.get('error')} |")
            continue
        first = batched["first_vs_sequential"]
        step = _cell(batched["per_step"]) if batched["per_step"] else "–"
        memory = batched["peak_memory"]["bytes"] if batched["peak_memory"] else None
        speedup = f"{batched['speedup_vs_sequential']:.2f}×"
        if not batched["denoised_as_one_batch"]:
            speedup += f" (denoising loops {batched['denoise_runs']}, not one batch)"
        if batched.get("error"):
            speedup += f" (then: {batched['error']})"
        lines.append(
            f"{head} {batched['edits_per_s']:.3g} | {_cell(batched['wall_s_per_batch'])} | {step} | {speedup} "
            f"| {format_bytes(memory)} | {first['max_pixel_diff_image']} / {first['max_pixel_diff_styled']} |"
        )
    if label:
        lines += ["", f"Batched edits/s: {label.removeprefix('batched: ')}. Batched step: one step of the "
                      "batched dual-UNet loop (all the batch's edits). First edit: the batch's first request is "
                      "the sequential timed edit (same seed and inputs): the same image, up to a batch size's other "
                      "kernel rounding (fp32 on the CPU: 0 or 1 level measured)."]
    return lines


REST_OF_TOTAL = "rest of the total"  # the chart's top segment: the total's median less the stages' medians


def chart_segments(run: dict) -> dict[str, float]:
    """A bar's segments, bottom up: each stage's median, then what the median total holds beyond them (reading
    the image, resizing; the baseline's attention store put on and taken off), so the bar is as tall as its label.
    Medians do not add: a total median below the stages' sum leaves that segment at 0."""
    segments = {stage: run["stages"][stage]["median"] for stage in STAGES}
    segments[REST_OF_TOTAL] = max(0.0, run["stages"]["total"]["median"] - sum(segments.values()))
    return segments


def write_chart(record: dict, path: Path) -> None:
    """Stacked bars of median per-stage seconds, one bar per implementation (baseline first), labelled with the
    median total."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for run in record["runs"] if "skipped" not in run]
    names = [run["name"].replace("+", "\n+") + f"\n{run['dtype']}" for run in runs]  # variant rows' long names
    segments = [chart_segments(run) for run in runs]
    figure, axes = plt.subplots(figsize=(2.2 + 1.6 * len(runs), 5))
    bottoms = [0.0] * len(runs)
    colours = plt.get_cmap("tab10").colors
    for index, part in enumerate(segments[0]):
        heights = [bar[part] for bar in segments]
        style = ({"color": "white", "edgecolor": "grey", "hatch": "///"} if part == REST_OF_TOTAL else
                 {"color": colours[index % len(colours)]})
        axes.bar(names, heights, bottom=bottoms, label=part, width=0.6, **style)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for position, run in enumerate(runs):
        axes.annotate(format_seconds(run["stages"]["total"]["median"]), (position, bottoms[position]),
                      ha="center", va="bottom", fontsize=9)
    config = record["config"]
    axes.set_ylabel("median seconds per edit")
    axes.set_title(f"zone bench {config['preset']}: {config['resolution']}², {config['steps']} steps, "
                   f"{record['machine']['device_name']}", fontsize=10)
    handles, labels = axes.get_legend_handles_labels()  # top down, as the bars stack them
    axes.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


NO_MATPLOTLIB = "skipped, matplotlib is not installed (pip install 'zone-engine[bench]')"


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_reports(record: dict, out: Path) -> dict[str, Path]:
    """bench.json, bench.md and, with matplotlib, bench.png under `out`, named after the preset; the paths
    written (a run of many minutes is not lost for want of the chart's library)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = report_paths(out, record["config"]["preset"])
    writers = {"json": lambda path: path.write_text(json.dumps(record, indent=2) + "\n"),
               "markdown": lambda path: path.write_text(markdown(record), encoding="utf-8")}  # its ² and ×: LC_ALL=C
    if has_matplotlib():
        writers["chart"] = lambda path: write_chart(record, path)
    for kind, write in writers.items():
        with written_atomically(paths[kind]) as temporary:  # an interrupted write leaves the last run's file whole
            write(temporary)
    return {kind: paths[kind] for kind in writers}
