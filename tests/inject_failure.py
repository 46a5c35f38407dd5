"""train.py with an error injected into one process's n-th optimizer step, to check that the
failure of one process ends the whole job: tests/test_faults.py runs it on gloo, and it runs the
same way on NCCL GPUs.

    torchrun --nproc_per_node 2 tests/inject_failure.py RANK STEP TRAIN_ARGS...

At the STEP-th call of must.must_step in this process (1 = its first step), the process of rank
RANK prints one line with the time and raises a RuntimeError, as an out-of-memory error or a bug
in a step would; the other processes run train.py unchanged.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import must  # noqa: E402
import train  # noqa: E402


def main():
    rank, step = int(sys.argv[1]), int(sys.argv[2])
    real, calls = must.must_step, [0]

    def must_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step and int(os.environ.get("RANK", 0)) == rank:
            print(f"injecting a failure at {time.time():.3f}", file=sys.stderr, flush=True)
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        return real(*args, **kwargs)

    must.must_step = must_step
    train.main(sys.argv[3:])


if __name__ == "__main__":
    main()
