"""The few-step table of the README's "Distillation": ``diffx eval`` exact match at 1, 2, 4 and 8 steps.

    OMP_NUM_THREADS=1 python scripts/bench_distill.py --teacher T.safetensors --progressive RUN --guided RUN \
        --reflow RUN/model.safetensors --out /tmp/bench_distill

Rows: the teacher with its best sampler at each step count (of euler, dpmpp, unipc), the teacher at 30
steps, and each student: a progressive or guided run's ``round<k>`` checkpoints sampled on their native
steps, the reflow student with Euler at each step count. Each eval is a ``diffx eval`` process run with
``OMP_NUM_THREADS=1``; its CPU time is measured. Writes ``results.json`` and prints a Markdown table.

For a teacher trained with ``data.holdout`` ``diffx eval`` scores two splits, ``heldout`` (combinations
never trained on) and ``seen``: each cell is then ``heldout / seen``, and "best" is by their mean.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

STEPS = (1, 2, 4, 8)
TEACHER_SAMPLERS = ("euler", "dpmpp", "unipc")


def evaluate(ckpt: Path, out: Path, cfg: float, captions: int, *overrides: str) -> tuple[dict[str, float], float]:
    """({split: exact match}, CPU seconds) of one ``diffx eval``; the splits are ``all``, or ``heldout``
    and ``seen`` for a checkpoint trained with a hold-out."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["diffx", "eval", f"ckpt={ckpt}", f"out={out}", f"cfg={cfg}", f"captions={captions}",
                    "save_grid=false", "overwrite=true", *overrides], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = json.loads((out / "eval.json").read_text())
    exact = {r.get("split", "all"): r["exact"] for r in report["results"] if r["cfg"] == cfg}
    return exact, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cell(exact: dict[str, float]) -> str:
    """``98.4%``, or ``96.9% / 100.0%`` (heldout / seen)."""
    return " / ".join(f"{100 * exact[k]:.1f}%" for k in ("all", "heldout", "seen") if k in exact)


def mean(exact: dict[str, float]) -> float:
    return sum(exact.values()) / len(exact)


def rounds(run: Path) -> dict[int, Path]:
    """A progressive or guided run's students by their native step count."""
    found = {}
    for done in sorted(run.glob("round*/done.json")):
        found[json.loads(done.read_text())["steps"]] = done.parent / "model.safetensors"
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, help="the teacher checkpoint (its rows are left out without it)")
    p.add_argument("--progressive", type=Path)
    p.add_argument("--guided", type=Path)
    p.add_argument("--reflow", type=Path, nargs="*", default=[],
                   help="reflow students' model.safetensors (e.g. RUN/reflow1/... RUN/reflow2/...)")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance of the teacher and of the students that take it")
    p.add_argument("--captions", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_distill"))
    args = p.parse_args(argv)
    rows, cpu = {}, {}

    def run(name: str, steps: int, ckpt: Path, cfg: float, *overrides: str) -> None:
        out = args.out / re.sub(r"[^A-Za-z0-9.]+", "_", name) / str(steps)  # no '=' or ',': Hydra parses out=
        exact, seconds = evaluate(ckpt, out, cfg, args.captions, *overrides)
        rows.setdefault(name, {})[steps] = exact
        cpu[name] = cpu.get(name, 0.0) + seconds
        print(f"{name:<40} {steps:>2} steps  exact {cell(exact)}  ({seconds:.0f} s CPU)", file=sys.stderr)

    for steps in STEPS if args.teacher else ():
        for sampler in TEACHER_SAMPLERS:
            run(f"teacher {sampler} cfg={args.cfg:g}", steps, args.teacher, args.cfg, f"sampler={sampler}", f"steps={steps}")
    if args.teacher:
        run(f"teacher dpmpp cfg={args.cfg:g}, 30 steps", 30, args.teacher, args.cfg, "sampler=dpmpp", "steps=30")
    for label, run_dir, cfg in (("progressive", args.progressive, args.cfg), ("guided", args.guided, args.cfg)):
        for steps, ckpt in sorted(rounds(run_dir).items()) if run_dir else ():
            if steps in STEPS:
                run(f"{label} student (native ddim) cfg={cfg:g}", steps, ckpt, cfg)
    for ckpt in args.reflow:
        for steps in STEPS:
            run(f"reflow student ({ckpt.parent.name}) euler cfg=1", steps, ckpt, 1.0, "sampler=euler", f"steps={steps}")

    print("| model | " + " | ".join(f"{s} step{'s' * (s > 1)}" for s in STEPS) + " | CPU time (eval) |")
    print("|---|" + "---|" * (len(STEPS) + 1))
    if args.teacher:
        cells = []
        for s in STEPS:
            scores = {n.split()[1]: rows[n][s] for n in rows if n.startswith("teacher ") and s in rows[n]}
            top = max(mean(v) for v in scores.values())
            best = [n for n, v in scores.items() if mean(v) == top]
            cells.append(f"{cell(scores[best[0]])} ({', '.join(best)})")
        print("| teacher, best sampler at each | " + " | ".join(cells) + " | |")
    for name, by_steps in rows.items():
        cells = [cell(by_steps[s]) if s in by_steps else "-" for s in STEPS]
        if 30 in by_steps:
            cells = [f"{cell(by_steps[30])} at 30 steps"] + [""] * (len(STEPS) - 1)
        print(f"| {name} | " + " | ".join(cells) + f" | {cpu[name]:.0f} s |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "cpu_s": cpu}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
