"""``otcfm reflow`` and ``otcfm distill``: pairs from a recorded teacher, then the student's training."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

from otcfm import distributed, reflow, report
from otcfm.cli.runs import check_out, load_run, nameable, table_name
from otcfm.rundir import RunDirectory

__all__ = ["pairs_command"]


def pairs_command(args: argparse.Namespace) -> int:
    """``otcfm reflow`` and ``otcfm distill``: pairs from the teacher, then the student's training."""
    teacher, config, source, teacher_stage = load_run(args.teacher, args.model, "--teacher")
    if not nameable(config.target):  # the W2 table draws reference samples from the teacher's target
        raise ValueError(
            f"--teacher: its target, {config.target}, was given in Python, and otcfm {args.command} evaluates "
            f"against it; run it in Python: otcfm.reflow.rectify(teacher, source) or generate_pairs + "
            f"{'train_on_pairs' if args.command == 'reflow' else 'distill'}"
        )
    classes = report.classes_of(teacher, config, report.data_of(config)[1]) if config.conditional else None
    if classes is None and args.guidance != 1.0:
        raise ValueError("--guidance: the teacher is not class-conditional (trained without labels)")
    out = check_out(args.out, args.resume, args.overwrite)  # after the checks above: no folder left by them
    started = time.perf_counter()
    pairs = reflow.generate_pairs(
        teacher,
        source,
        args.pairs,
        args.solver_steps,
        args.method,
        out / "pairs",
        seed=args.seed,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        classes=classes,
        guidance=args.guidance,
    )
    student = copy.deepcopy(teacher)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(reflow.RunOptions) if hasattr(args, f.name)}
    directory = RunDirectory(out)  # a resume's one read of the checkpoint: the step it starts at, then the engine's
    run = reflow.RunOptions(**{**given, "out": directory, "record": {"config": dataclasses.asdict(config)}})
    common = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "progress": not args.no_progress,
        "run": run,
    }
    checkpoint = directory.checkpoint_path
    start = int((directory.saved() or {}).get("step", 0)) if args.resume else 0
    if args.command == "reflow":
        reflow.train_on_pairs(pairs, student, time_sampler=args.time_sampler, **common)
    else:
        reflow.distill(student, pairs, loss=args.loss, **common)
    seconds = time.perf_counter() - started
    if distributed.world()[0] > 0:
        return 0  # rank 0 evaluates and reports
    student = student.cpu()
    resumed = f" (resumed at step {start})" if start else ""
    print(
        f"{args.command}: {args.pairs} pairs and {args.steps - start} steps{resumed} in {seconds:.1f} s "
        f"({args.steps} in all); checkpoint: {checkpoint}"
    )
    plot_steps = 1 if args.command == "distill" else 100  # a one-step model is drawn as what it is
    evaluation = report.evaluate(
        student,
        config,
        args.eval_n,
        args.eval_draws,
        out,
        args.command,
        plot_steps,
        guidance=args.eval_guidance,
        teacher=teacher_stage,
    )
    evaluation["seconds"] = seconds
    (out / table_name(evaluation)).write_text(json.dumps(evaluation, indent=2))
    report.print_table(evaluation, config)
    print(f"figure: {evaluation['png']}")
    return 0


#: Errors that mean "the user asked for something that cannot be done": one line, exit code 2. Anything else is
