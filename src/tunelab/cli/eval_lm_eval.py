"""``tunelab eval lm-eval``: lm-evaluation-harness tasks on a model tunelab loads, from local task files."""

import argparse

from tunelab.cli.data import _Parser
from tunelab.cli.eval import _emit, _load, _model_options


def cmd_lm_eval(argv: list[str]) -> int:
    parser = _Parser(
        prog="tunelab eval lm-eval",
        description="Run lm-evaluation-harness tasks (pip install 'tunelab[lmeval]') on a model, offline: tasks come "
        "from --include-path or ship with tunelab (gsm8k_local, on the file given by --data).",
    )
    _model_options(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated task names: gsm8k_local, or tasks of --include-path")
    parser.add_argument("--include-path", help="a folder of lm_eval task YAMLs whose data are local files (dataset_path: json, dataset_kwargs.data_files)")
    parser.add_argument("--data", help="the data file of the shipped tasks (gsm8k_local: JSON lines with question and answer)")
    parser.add_argument("--limit", type=int, help="evaluate the first N documents of each task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-fewshot", type=int, help="shots before each question (default: the task's; gsm8k_local: 0)")
    parser.add_argument("--gen-kwargs", help="override the tasks' generation settings, as lm_eval takes them: max_gen_toks=512")
    parser.add_argument(
        "--chat-template", action=argparse.BooleanOptionalAction, default=True,
        help="render each prompt as the user turn of the tokenizer's chat template, as tunelab eval generate does (default: on)",
    )  # fmt: skip
    parser.add_argument("-o", "--output-dir", help="write results.json, samples_TASK.jsonl and the task YAMLs that ran here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from tunelab.evaluation.lm_eval_bridge import check_tasks, run_lm_eval

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    check_tasks(tasks, args.include_path, args.data)  # before minutes of model loading
    report = run_lm_eval(
        _load(args), tasks, args.include_path, args.limit, args.batch_size, args.num_fewshot, args.output_dir,
        args.gen_kwargs, args.chat_template, data_file=args.data,
    )  # fmt: skip
    _emit(report, args.json)
    return 0
