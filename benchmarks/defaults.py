"""Every default run, per seed, beside the floors of its split (the table in benchmarks/README.md).

    python benchmarks/defaults.py --seeds 0,1,2 --out benchmarks/results/DATE-defaults.jsonl
    python benchmarks/defaults.py --runs online_kd --seeds 0     # the main command alone

Each run is ``train.py --config=<config> --config.seed=N`` in its own workdir (kept, so a rerun
resumes instead of training again), timed as a whole process. One JSON line per run: the config,
seed, wall seconds, the 1-minute load before and after, the validation kappa at the best step (the
checkpoint eval, predict and export use) and at the last step, for a KD run the teacher's too, and
the classical floors (plain and with +-2 epochs of context) of both signals on the same split.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = {  # name -> (config, the signal of its trained model)
    "scalp_teacher": ("configs/supervised.py:scalp", "scalp"),
    "ear_only": ("configs/supervised.py:ear", "ear"),
    "online_kd": ("configs/online_kd.py", "ear"),
}


def validation_records(workdir: pathlib.Path) -> list[dict]:
    records = []
    for line in (workdir / "metrics.jsonl").read_text().split("\n"):
        if line.strip():
            record = json.loads(line)
            if record.get("split") == "validation":
                records.append(record)
    return records


def floors(config: str) -> dict:
    """The floors of the run's split (the same call the train command's final line makes)."""
    sys.path.insert(0, str(ROOT))
    import importlib.util

    from eegkd_jax.baseline import validation_floors

    file, _, variant = config.partition(":")
    spec = importlib.util.spec_from_file_location("run_config", ROOT / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = (module.get_config(variant) if variant else module.get_config()).data
    plain = validation_floors(data)
    context = validation_floors(data, context=2)
    return {**{f"floor_{k}": round(v, 4) for k, v in plain.items()},
            **{f"floor_{k}_context": round(v, 4) for k, v in context.items()}}


def run(name: str, seed: int, workdir_root: pathlib.Path) -> dict:
    config, signal = RUNS[name]
    workdir = workdir_root / f"{name}-seed{seed}"
    command = [sys.executable, "train.py", f"--config={config}", f"--config.seed={seed}",
               f"--workdir={workdir}"]
    load_before = os.getloadavg()[0]
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    records = validation_records(workdir)
    best = max(records, key=lambda r: r["kappa"])
    out = {"run": name, "config": config, "seed": seed, "signal": signal,
           "command": " ".join(["python", *command[1:]]),
           "wall_s": round(seconds, 1), "load_1min_before": round(load_before, 2),
           "load_1min_after": round(os.getloadavg()[0], 2),
           "best_step": best["step"], "kappa_best": round(best["kappa"], 4),
           "last_step": records[-1]["step"], "kappa_last": round(records[-1]["kappa"], 4),
           "final_line": done.stdout.strip().splitlines()[-1]}
    if "teacher_kappa" in best:
        out["teacher_kappa_best_student_step"] = round(best["teacher_kappa"], 4)
        out["teacher_kappa_last"] = round(records[-1]["teacher_kappa"], 4)
    return {**out, **floors(config)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated: {list(RUNS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workdirs", default="runs/defaults")
    parser.add_argument("--out", default="", help="also append the JSON lines to this file")
    args = parser.parse_args()
    root = (ROOT / args.workdirs).absolute()
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.runs.split(","):
            line = json.dumps(run(name, seed, root))
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
