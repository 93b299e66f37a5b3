"""python -m launch.harness --model PATH --tasks T1,T2 [--include-path DIR] [--num-fewshot N] [--limit N]

Runs lm-evaluation-harness tasks on an export (either format), a run dir or a checkpoint dir through
pretrain/harness.py's RecurrentLM (loglikelihood, loglikelihood_rolling, generate_until with the
recurrent cache). Needs lm_eval, which is optional: pip install -e '.[harness]'. --include-path
adds a directory of task YAMLs (e.g. tasks over local files).
"""
from __future__ import annotations

import argparse
import json
import sys

from launch.errors import run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.harness", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an export dir (launch.export), a run dir, or a checkpoint dir")
    parser.add_argument("--tasks", required=True, help="comma-separated lm_eval task names")
    parser.add_argument("--include-path", help="a directory of extra task YAMLs")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--limit", type=float, help="documents per task (or a fraction of them)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048, help="tokens of context kept (default 2048)")
    parser.add_argument("--output", help="also write lm_eval's results dict to this JSON file")
    args = parser.parse_args(argv)

    from pretrain.config import ConfigError

    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError as e:
        raise ConfigError(f"lm_eval is not installed ({e.name}); install it with pip install -e '.[harness]' "
                          f"(lm_eval pulls datasets, pandas, scipy, scikit-learn)") from None
    from pretrain.harness import RecurrentLM

    lm = RecurrentLM(model=args.model, batch_size=args.batch_size, max_length=args.max_length)
    manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--tasks {','.join(unknown)}: no such lm_eval task (see lm_eval --tasks list"
                          f"{'' if args.include_path else '; tasks of your own: --include-path DIR'})")
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=args.num_fewshot,
                              limit=args.limit, bootstrap_iters=0)
    print(make_table(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results["results"], f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "harness"))
