"""``tunelab`` command line: parse, call the library, print. No logic lives here."""

import argparse
import logging
import sys

from tunelab.errors import TunelabError, UsageError

TRAIN_HELP = """usage: tunelab train [KEY=VALUE | GROUP=OPTION ...] [--cfg job] [--debug]

Train with Hydra overrides over the shipped config tree, e.g.

  tunelab train method=lm_finetune/fullfinetune_sft modelpool=CausalLMPool/smollm2-135m \\
      data.path=train.jsonl data.format=prompt_completion \\
      data.prompt_field=question data.completion_field=answer \\
      taskpool=heldout-loss data.val_fraction=0.1 output_dir=runs/gsm8k method.max_epochs=1

Options:
  --cfg job     print the resolved config and exit without training
  --debug       show tracebacks and debug logs

Config groups (GROUP=OPTION):
{groups}

Top-level keys: output_dir, overwrite, seed, gradient_checkpointing, log_every_n_steps, progress_bar
Data keys (data.KEY=...):
{data_keys}
Method, model pool, task pool and fabric keys: see the YAML of each option under
{config_dir}, or print them with --cfg job.
"""


def _train_help() -> str:
    import dataclasses

    from tunelab.config import CONFIG_DIR, DataConfig, list_groups

    groups = "\n".join(f"  {g:<10} {', '.join(opts)}" for g, opts in list_groups().items())
    data_keys = "\n".join(f"  {f.name}" for f in dataclasses.fields(DataConfig))
    return TRAIN_HELP.format(groups=groups, data_keys=data_keys, config_dir=CONFIG_DIR)


def _split_flags(argv: list[str]) -> tuple[list[str], dict]:
    flags = {"cfg": None, "debug": False, "help": False}
    overrides = []
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            flags["help"] = True
        elif arg == "--debug":
            flags["debug"] = True
        elif arg in ("--cfg", "-c"):
            flags["cfg"] = next(args, "job")
        elif arg.startswith("--cfg="):
            flags["cfg"] = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise UsageError(f"Unknown flag '{arg}'. tunelab train takes KEY=VALUE overrides, --cfg job, --debug and --help.")
        else:
            overrides.append(arg)
    return overrides, flags


def cmd_train(argv: list[str]) -> int:
    overrides, flags = _split_flags(argv)
    if flags["help"]:
        print(_train_help())
        return 0
    from omegaconf import OmegaConf

    from tunelab.config import compose_config, validate_config

    cfg = compose_config(overrides)
    if flags["cfg"]:
        validate_config(cfg)
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return 0
    from tunelab.engine import train

    result = train(cfg)
    if not result.is_global_zero:
        return 0
    if result.stopped:
        print(f"\nStopped at step {result.state.global_step} (SIGTERM) after {result.train_seconds:.0f} s of training.\n"
              f"  checkpoint: {result.final_checkpoint}\n"
              f"  resume:     tunelab train {' '.join(overrides)} method.ckpt_path={result.output_dir / 'checkpoints'}")
        return 0
    print(f"\nFinished {result.state.global_step} steps in {result.train_seconds:.0f} s "
          f"({result.tokens_per_s:.0f} tokens/s, {result.supervised_tokens_per_s:.1f} "
          f"{'supervised tokens' if result.loss_unit == 'token' else result.loss_unit + 's'}/s)")
    if result.evaluations:
        first, last = min(result.evaluations), max(result.evaluations)
        for key in result.evaluations[last]:
            print(f"  {key}: {result.evaluations[first].get(key, float('nan')):.4f} (step {first}) -> "
                  f"{result.evaluations[last][key]:.4f} (step {last})")
    print(f"  checkpoint: {result.final_checkpoint}")
    for export in result.exports:
        verdict = "verified" if export["passed"] else ("FAILED: " + export["error"] if "error" in export else "FAILED verification")
        print(f"  export {export['target']}: {export.get('path', '-')} ({verdict})")
    print(f"  metrics:    {result.metrics_csv}")
    if result.loss_curve:
        print(f"  loss curve: {result.loss_curve}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tunelab demo", description="Fine-tune SmolLM2-135M on shipped GSM8K problems.")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--quick", action="store_true", help="a tiny random model and a few steps (seconds; for tests)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    from tunelab.demo import run_demo

    report = run_demo(args.output_dir, quick=args.quick)
    print(report.render())
    return 0


def cmd_data(argv: list[str]) -> int:
    from tunelab.cli.data import cmd_data as run

    return run(argv)


def cmd_eval(argv: list[str]) -> int:
    from tunelab.cli.eval import cmd_eval as run

    return run(argv)


def cmd_export(argv: list[str]) -> int:
    from tunelab.cli.export import cmd_export as run

    return run(argv)


def cmd_registry(argv: list[str]) -> int:
    from tunelab.cli.registry import cmd_registry as run

    return run(argv)


def cmd_serve(argv: list[str]) -> int:
    from tunelab.cli.serve import cmd_serve as run

    return run(argv)


def cmd_board(argv: list[str]) -> int:
    from tunelab.cli.board import cmd_board as run

    return run(argv)


def cmd_plan(argv: list[str]) -> int:
    from tunelab.cli.plan import cmd_plan as run

    return run(argv)


COMMANDS = {"train": cmd_train, "data": cmd_data, "eval": cmd_eval, "export": cmd_export, "registry": cmd_registry, "serve": cmd_serve,
            "plan": cmd_plan, "board": cmd_board, "demo": cmd_demo}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(
            "usage: tunelab {train,data,eval,export,registry,serve,plan,board,demo} ...\n\n  train   fine-tune a model (tunelab train --help)\n"
            "  data    inspect, validate, clean and prepare data files (tunelab data --help)\n"
            "  eval    perplexity, generation metrics, base-vs-tuned reports, human rating, A/B tests (tunelab eval --help)\n"
            "  export  merged transformers folders and GGUF files (models and LoRA adapters), verified (tunelab export --help)\n"
            "  registry  versions of trained models with their lineage; promote and roll back (tunelab registry --help)\n"
            "  serve   a model and its adapters behind an OpenAI-compatible API (tunelab serve --help)\n"
            "  plan    advice before a run: which approach fits the use case (tunelab plan --help)\n"
            "  board   a local web page: launch runs, watch their curves, chat base vs tuned, compare runs (tunelab board --help)\n"
            "  demo    fine-tune SmolLM2-135M on GSM8K problems shipped with tunelab"
        )
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    debug = "--debug" in argv
    from tunelab.progress import setup_logging

    setup_logging(debug)
    try:
        return COMMANDS[argv[0]](argv[1:])
    except TunelabError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        logging.getLogger("tunelab").warning("Interrupted; the last checkpoint written is intact.")
        return 130
    except Exception as err:  # noqa: BLE001 - the one place an unexpected failure becomes a paragraph
        if debug:
            raise
        print(f"error: {unexpected_failure(argv[0], err)}", file=sys.stderr)
        return 1


def unexpected_failure(command: str, err: BaseException) -> str:
    """One paragraph for an exception tunelab did not foresee: what failed, where, the
    exception's own message, and how to see the traceback."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "/tunelab/" in f.filename.replace("\\", "/")]
    frame = (ours or frames or [None])[-1]
    where = f" in {frame.filename.split('/tunelab/')[-1] if ours else frame.filename}:{frame.lineno} ({frame.name})" if frame else ""
    if isinstance(err, OSError) and err.filename:
        return (f"tunelab {command} failed on '{err.filename}': {err.strerror}. Check that the path exists and is writable, and that the disk has room; "
                f"run again with --debug for the traceback.")  # fmt: skip
    message = str(err).strip().replace("\n", " ") or "(no message)"
    return (f"tunelab {command} failed unexpectedly{where}: {type(err).__name__}: {message}. "
            "This input is one tunelab does not check yet; run again with --debug for the traceback, and please report it.")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
