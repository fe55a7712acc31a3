"""python tests/run_examples.py OUT_DIR NAME...  (the examples test's launcher)

Imports what the examples import (torch, transformers, peft, accelerate, trl, datasets,
asft_optim: most of an example's run time), then runs each ``examples/NAME.py`` as
``__main__`` in a process of its own, forked from this one, one after another: each
starts from a fresh interpreter state (its own globals, accelerate's singletons not yet
created) and writes its stdout and stderr to ``OUT_DIR/NAME.out`` / ``NAME.err``.
Prints one JSON line ``{NAME: exit status}``.
"""

import json
import os
import runpy
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import accelerate  # noqa: E402, F401
import datasets  # noqa: E402, F401
import peft  # noqa: E402, F401
import torch  # noqa: E402, F401
import trl  # noqa: E402, F401
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, Trainer  # noqa: E402, F401
from trl import SFTTrainer  # noqa: E402, F401

import asft_optim  # noqa: E402, F401
import asft_optim.integrations  # noqa: E402, F401


def run(path: Path, out: Path, err: Path) -> int:
    """Fork; the child runs ``path`` as ``__main__`` with its output in ``out`` / ``err``."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    code = 1
    try:
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        sys.argv = [str(path)]
        runpy.run_path(str(path), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # the child never returns into the launcher's loop


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    status = {name: run(ROOT / "examples" / f"{name}.py", out_dir / f"{name}.out", out_dir / f"{name}.err")
              for name in sys.argv[2:]}
    print(json.dumps(status), flush=True)
