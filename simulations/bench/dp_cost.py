"""``fedrec bench dp-cost``: what DP-SGD costs against non-private training of the same model.

Both modes train the same model (the DP settings: ``dp_dim``, ``dp_max_len``) and the same
weights (``dp_train``: ``text``, the default, ``bias``, or ``all`` for the full per-sample
cost) on the same customers with the same batch size for one epoch, each in a fresh process
so that peak memory (max RSS; on a GPU, the most the GPU held) is its own. Reported: seconds
per epoch and peak memory, and their DP / non-DP ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from simulations.train import add_run_config_arguments, run_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="dataset directory")
    parser.add_argument(
        "--customers", type=int, default=4096, help="customers in the measured epoch (default 4096)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_dp_cost.json"), help="JSON output")
    parser.add_argument("--mode", choices=("plain", "dp"), default=None, help=argparse.SUPPRESS)
    add_run_config_arguments(parser)


def measure(args: argparse.Namespace) -> dict:
    """One epoch in this process (``args.mode``): seconds and peak RSS."""
    import torch

    from shared.recommender.experiment import Experiment
    from shared.recommender.training import (
        select_trainable,
        train_epoch,
        train_private,
        training_tensors,
    )

    config = run_config_from_args(args, dp=True)
    experiment = Experiment.prepare(args.data, config, show_progress=False)
    histories = experiment.train_histories(config.refit)[: args.customers]
    model = experiment.new_model()
    inputs, targets = training_tensors(histories, model.config.max_len)
    on_gpu = experiment.device.startswith("cuda")
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline_gpu = torch.cuda.memory_allocated()
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.time()
    if args.mode == "dp":
        train_private(
            model,
            inputs,
            targets,
            epochs=1,
            expected_batch=config.dp_batch_size,
            noise_multiplier=1.0,
            max_grad_norm=config.max_grad_norm,
            lr=config.dp_lr,
            device=experiment.device,
            trainable=config.dp_train,
        )
    else:
        optimizer = torch.optim.Adam(select_trainable(model, config.dp_train), lr=config.dp_lr)
        train_epoch(model, optimizer, inputs, targets, config.dp_batch_size, experiment.device)
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mode": args.mode,
        "customers": len(inputs),
        "epoch_s": round(seconds, 2),
        "peak_rss_mb": round(peak / 1024, 1),
        "training_rss_mb": round((peak - baseline_rss) / 1024, 1),
        "dim": model.config.dim,
        "max_len": model.config.max_len,
        "trained_parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "dp_train": config.dp_train,
        "threads": torch.get_num_threads(),
        "batch": config.dp_batch_size,
        "device": experiment.device,
        "training_gpu_mb": (
            round((torch.cuda.max_memory_allocated() - baseline_gpu) / 2**20, 1) if on_gpu else None
        ),
    }


def run(args: argparse.Namespace) -> int:
    if args.mode:
        print(json.dumps(measure(args)))
        return 0
    results = {}
    for mode in ("plain", "dp"):
        command = [
            sys.executable,
            "-m",
            "simulations.cli",
            "bench",
            "dp-cost",
            "--data",
            str(args.data),
            "--customers",
            str(args.customers),
            "--mode",
            mode,
            *[f"--set={o}" for o in args.overrides],
            *(["--device", args.device] if args.device else []),
        ]
        print(f"measuring {mode} training ...", flush=True)
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
    results["time_ratio"] = round(results["dp"]["epoch_s"] / results["plain"]["epoch_s"], 2)
    on_gpu = results["dp"]["training_gpu_mb"] is not None
    memory = "training_gpu_mb" if on_gpu else "training_rss_mb"
    results["memory_ratio"] = round(results["dp"][memory] / max(results["plain"][memory], 1.0), 2)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for mode in ("plain", "dp"):
        r = results[mode]
        print(
            f"{mode:>5}: {r['epoch_s']:7.1f} s/epoch on {r['device']}, training memory "
            f"{r['training_rss_mb']} MB (peak RSS {r['peak_rss_mb']} MB)"
            + (f", GPU {r['training_gpu_mb']} MB" if r["training_gpu_mb"] is not None else "")
        )
    print(
        f"DP / non-DP: {results['time_ratio']}x time, {results['memory_ratio']}x memory "
        f"-> {args.out}"
    )
    return 0
