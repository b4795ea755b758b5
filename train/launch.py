"""torchrun, with zhllama's way of ending: launch a training script on N processes and
let the workers' own one-line messages be the whole story.

    python -m train.launch --nproc_per_node 8 train/pretrain.py configs/llama-7b-stage2.yaml
    python -m train.launch --nnodes 2 --node_rank 0 --rdzv_endpoint host:29500 \\
        --nproc_per_node 8 train/sft.py configs/llama-7b-sft.yaml

Every torchrun option works (it is torchrun's own parser and launcher, run in this
process). What changes is the end: torchrun answers Ctrl-C with a traceback of its own
and a failed worker with a table; here a stop exits 130 and a failure exits with the
worker's code, after the worker's `error:` line, and nothing else. Plain
`torchrun train/pretrain.py cfg.yaml` keeps working.
"""

from __future__ import annotations

import logging
import sys

from tokenizer.cli import command_errors, shown_prog


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()
    parser.prog, parser.description = shown_prog("python -m train.launch"), __doc__.split("\n\n")[0]
    args = parser.parse_args(argv)
    # torchrun's own log lines (the OMP_NUM_THREADS banner, "Sending closing signal",
    # "failed (exitcode: 1)") repeat what the workers say; keep them for real faults.
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with command_errors():  # the launcher's own failures (a rendezvous, a port) in one line
        try:
            run(args)
        except SignalException:
            raise SystemExit(130) from None  # the workers said where the run can resume
        except ChildFailedError as e:
            rank, failure = min(e.failures.items())
            code = failure.exitcode
            if code not in (1, 130):  # not an `error:` line of ours: a crash, a kill, a signal
                how = f"signal {failure.signal_name()}" if code < 0 else f"exit code {code}"
                print(f"error: rank {rank} ended with {how}", file=sys.stderr)
            raise SystemExit(code if code > 0 else 1) from None


if __name__ == "__main__":
    main()
