"""torchrun --nproc_per_node=2 tests/dist/all_checks.py CHECKPOINT_DIR  (gloo, CPU)

The three checks of this folder in one launch: ``ddp_check``, ``fsdp2_check`` and
``dcp_check``, in that order, each in a process group of its own and printing its own
line. The test suite pays torchrun's start, the interpreters and their imports once
instead of three times; a check that fails stops the launch (the later ones do not run).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dcp_check  # noqa: E402
import ddp_check  # noqa: E402
import fsdp2_check  # noqa: E402

if __name__ == "__main__":
    ddp_check.main()
    fsdp2_check.main()
    dcp_check.main(sys.argv[1])
    # See fsdp2_check.py: skip interpreter teardown (gloo threads can abort a rank).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
