"""Schedule search wall time with and without prefix replay (``calibrate_schedule(reuse_prefix=...)``).

    python benchmarks/cache_search_speed.py [--models fashion-flux fashion-sd] [--threads 1]

For each zoo model and setting of ``cache_blocks.py`` (the same calibration prompts, seed, batch, budget and
``max_passes=2``), ``calibrate_schedule`` runs twice in this process, each schedule from step 0
(``reuse_prefix=False``) and replaying the denoiser outputs a schedule shares with one tried before
(``reuse_prefix=True``, the default), in alternating order over the settings. Reported: wall time of each
search, their ratio, whether both found the same schedule (they must: the errors are bit-identical), the
schedules tried and the share of denoiser calls answered by replay. The report is rewritten after every
setting; a rerun keeps the rows it holds (each names its machine) and runs the missing ones.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from cli_options import COUNT, RESULTS, script_parser

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cache_blocks as cb  # noqa: E402
from zoo_quality import DEFAULTS  # noqa: E402

from diffusion_accel import zoo  # noqa: E402
from diffusion_accel.cache import calibrate_schedule  # noqa: E402
from diffusion_accel.cache.configs import config_to_dict  # noqa: E402
from diffusion_accel.cache.prefix import PrefixReplay  # noqa: E402
from diffusion_accel.eval.machine import machine_info, machine_summary  # noqa: E402


class CountedReplay(PrefixReplay):
    """PrefixReplay noting its last instance's call counts (the search builds its own)."""

    last: "CountedReplay | None" = None

    def __enter__(self) -> "CountedReplay":
        CountedReplay.last = self
        return super().__enter__()


def search(pipe: Any, model: str, calib: list, kwargs: dict, options: dict, reuse_prefix: bool) -> dict:
    """One search: its schedule, wall time and replay counts."""
    options, steps = dict(options), DEFAULTS[model]["num_inference_steps"]
    full = options.pop("full")
    start = time.perf_counter()
    config = calibrate_schedule(pipe, calib, budget=full / steps, num_inference_steps=steps, max_passes=2,
                                batch_size=cb.CALIBRATION_BATCH[model], reuse_prefix=reuse_prefix,
                                **options, **kwargs)
    seconds = time.perf_counter() - start
    replay = CountedReplay.last
    return {"search_s": round(seconds, 1), "config": config_to_dict(config), "full_steps": list(config.full_steps),
            "denoiser_calls": replay.total_calls, "replayed_calls": replay.replayed_calls}


def write(report: dict, out: Path) -> None:
    """JSON and a Markdown table beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    lines = ["# Schedule search with prefix replay", "",
             "`calibrate_schedule` (refine search, `max_passes=2`, cache_blocks.py's prompts, seeds, batches and "
             "budgets) without and with prefix replay, in one process, alternating order; wall seconds. "
             f"Machine: {machine_summary(report['machine'])}.", "",
             "| model | setting | from step 0 (s) | replaying prefixes (s) | speed-up | same schedule | "
             "denoiser calls replayed |", "|---|---|---|---|---|---|---|"]
    for key, row in report["rows"].items():
        plain, replay = row["plain"], row["replay"]
        lines.append(f"| {row['model']} | {row['setting']} | {plain['search_s']} | {replay['search_s']} | "
                     f"{plain['search_s'] / replay['search_s']:.2f}x | {row['same_schedule']} | "
                     f"{replay['replayed_calls']:,} of {replay['denoiser_calls']:,} "
                     f"({replay['replayed_calls'] / replay['denoiser_calls']:.0%}) |")
    lines += [f"\nNot run: {key} ({why})." for key, why in report.get("not_run", {}).items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = script_parser(__doc__, RESULTS / "cache_search_speed.json")
    parser.add_argument("--models", nargs="+", default=list(cb.SETTINGS), choices=list(cb.SETTINGS))
    parser.add_argument("--threads", type=COUNT, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import diffusion_accel.cache.calibrated as calibrated

    calibrated.PrefixReplay = CountedReplay  # the search's own instance then reports its call counts
    report = json.loads(args.out.read_text()) if args.out.is_file() else {"machine": machine_info()}
    report.update({"threads": args.threads, "command": " ".join(["python", *sys.argv])})
    rows, order = report.setdefault("rows", {}), 0
    for model in args.models:
        pipe = zoo.load(model)
        pipe.set_progress_bar_config(disable=True)
        calib, kwargs, _ = cb.model_calls(model, pipe, held_out=1)  # its held-out calls go unused
        for setting, options in cb.SETTINGS[model].items():
            if f"{model}/{setting}" in rows:  # kept from an earlier run (the alternating order counts it)
                order += 1
                continue
            runs = {}
            for reuse in ((False, True) if order % 2 == 0 else (True, False)):
                runs["replay" if reuse else "plain"] = search(pipe, model, calib, kwargs, options, reuse)
                print(model, setting, "replay" if reuse else "plain", runs["replay" if reuse else "plain"],
                      flush=True)
            order += 1
            rows[f"{model}/{setting}"] = {
                "model": model, "setting": setting, **runs, "machine": machine_summary(machine_info()),
                "same_schedule": runs["plain"]["config"] == runs["replay"]["config"]}
            report.get("not_run", {}).pop(f"{model}/{setting}", None)
            write(report, args.out)
    return report


if __name__ == "__main__":
    main()
